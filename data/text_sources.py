"""Raw text documents from local files and Hugging Face datasets, streamed through `datasets`.

An *input* is one string, resolved in this order:
  - `hf:NAME[:CONFIG]`                  a Hugging Face dataset (the prefix forces the hub);
  - an existing file                    read with the format of its extension (or `input_format`);
  - an existing folder                  every data file below it (hidden entries skipped);
  - a glob (`*`, `?`, `[`; `**` recurses) every file it matches;
  - `NAME[:CONFIG]` like `org/name`     a Hugging Face dataset, when no such local path exists.
Extensions: .jsonl/.json/.ndjson -> json, .parquet -> parquet, .arrow -> arrow, .txt -> text,
each optionally compressed (.gz, .bz2, .xz, .zst; `datasets` decompresses while streaming).
Files of one input are read in sorted path order, inputs in the order given, so the document
order is deterministic. Every file is streamed (`streaming=True`): corpora larger than memory work.

Plain text gives one document per file (`text_mode="document"`, default; the whole file is one
string in memory), per blank-line-separated paragraph ("paragraph") or per line ("line").
Line endings are normalised to "\\n" (Python's universal newlines).

Every input record is reported, kept or not, so that callers can cut the stream at fixed record
positions (`prepare` does: shard k covers records [k*N, (k+1)*N)). Skip reasons:
  empty         the text is empty or whitespace only;
  missing_text  the record has no value (null) for the text field;
  empty_file    a file without any record (reported as one record);
  invalid_utf8  the text held bytes that are not UTF-8 and `invalid_utf8="skip"`.
With `invalid_utf8="replace"` (default) such texts are kept with U+FFFD for each bad byte run and
reported with reason "invalid_utf8" but a text. Bad bytes are spotted by decoding through an
error handler that marks them with the noncharacter U+FDD0 (noncharacters are reserved for
process-internal use like this); a real U+FDD0 in the input is therefore counted as invalid too.
"""

from __future__ import annotations

import codecs
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

FORMATS = ("json", "parquet", "arrow", "text")
TEXT_MODES = ("document", "paragraph", "line")
INVALID_UTF8 = ("replace", "skip")
EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
              ".arrow": "arrow", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SKIP_REASONS = ("empty", "missing_text", "empty_file", "invalid_utf8")

_MARK = "\ufdd0"
_ERRORS = "spikingbrain-mark-invalid"
codecs.register_error(_ERRORS, lambda e: (_MARK, e.end))
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_BATCH = 1024  # records per arrow batch pulled from `datasets`


class Record(NamedTuple):
    """One input record: `text` is None when skipped; `reason` says why it was skipped, or
    "invalid_utf8" for a kept text whose bad bytes were replaced; None for a clean document."""

    text: str | None
    reason: str | None


class HubUnreachable(ConnectionError):
    """A dataset name was not a local path and the Hugging Face hub could not be reached."""


@dataclass(frozen=True)
class Source:
    """One resolved input: local files of one input string, or a hub dataset."""

    input: str
    files: tuple[tuple[str, str], ...] = ()  # (absolute path, format)
    hub: str | None = None
    hub_config: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able description (also what makes a re-run 'the same input')."""
        if self.hub is not None:
            return {"input": self.input, "hub": self.hub, "config": self.hub_config}
        return {"input": self.input,
                "files": [{"path": p, "format": f, "bytes": os.path.getsize(p)} for p, f in self.files]}


@dataclass
class TextReader:
    """Documents of `inputs` (see the module docstring) with the text in `text_field`.

    `records()` yields every input record in order; `documents()` only the kept texts. Both may be
    called again and give the same stream. `input_format` forces one format for all local files;
    `split` is the split read from hub datasets.
    """

    inputs: Sequence[str | os.PathLike]
    text_field: str = "text"
    text_mode: str = "document"
    invalid_utf8: str = "replace"
    input_format: str | None = None
    split: str = "train"
    sources: list[Source] = field(init=False)

    def __post_init__(self) -> None:
        _choice("text_mode", self.text_mode, TEXT_MODES)
        _choice("invalid_utf8", self.invalid_utf8, INVALID_UTF8)
        if self.input_format is not None:
            _choice("input format", self.input_format, FORMATS)
        if not self.inputs:
            raise ValueError("no input given")
        self.inputs = [os.fspath(s) for s in self.inputs]
        self.sources = [resolve_input(s, self.input_format) for s in self.inputs]
        seen: dict[str, str] = {}
        for src in self.sources:
            for path, _ in src.files:
                if path in seen:  # reading a file twice would silently repeat its data
                    raise ValueError(f"file {path} is matched by inputs {seen[path]!r} and {src.input!r}")
                seen[path] = src.input

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sources]

    def records(self) -> Iterator[Record]:
        for src in self.sources:
            if src.hub is not None:
                yield from self._records(_load_hub(src, self.split), src.hub)
            for path, fmt in src.files:
                yield from self._file_records(path, fmt)

    def documents(self) -> Iterator[str]:
        return (r.text for r in self.records() if r.text is not None)

    def _file_records(self, path: str, fmt: str) -> Iterator[Record]:
        if os.path.getsize(path) == 0 or (fmt == "parquet" and _parquet_rows(path) == 0):
            # builders fail on these (zero bytes; a parquet file without rows), and there is
            # nothing to read anyway
            yield Record(None, "empty_file")
            return
        n = 0
        for n, rec in enumerate(self._records(self._load_file(path, fmt), path), 1):
            yield rec
        if n == 0:
            yield Record(None, "empty_file")

    def _load_file(self, path: str, fmt: str):
        import datasets

        kwargs: dict[str, Any] = {}
        if fmt == "text":
            kwargs = dict(sample_by=self.text_mode, keep_linebreaks=self.text_mode != "line",
                          encoding_errors=_ERRORS)
        elif fmt == "json":
            # "utf-8-sig" (BOM tolerated) is not spelled "utf-8", so the json builder decodes each
            # chunk with our error handler instead of handing raw bytes to pyarrow, which would
            # reject the whole file at the first bad byte.
            kwargs = dict(encoding="utf-8-sig", encoding_errors=_ERRORS)
        # `load_dataset` sends a download-count request (3 s timeout) for every call: one per
        # local file, which stalls on machines without network. Reading a local file counts nothing.
        counts, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, False
        try:
            return datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True, **kwargs)
        except Exception as e:
            raise ValueError(f"cannot read {path} as {fmt}: {e}") from e
        finally:
            datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts

    def _records(self, ds, where: str) -> Iterator[Record]:
        is_text = ds.info.builder_name == "text"
        fld = "text" if is_text else self.text_field
        # datasets splits paragraphs at every "\n\n": a third newline would lead the next one
        trim = is_text and self.text_mode == "paragraph"
        columns = ds.column_names
        if columns is not None and fld not in columns:
            raise _missing_field(where, fld, columns)
        batches = iter(ds.select_columns([fld]).iter(batch_size=_BATCH))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (KeyError, ValueError) as e:  # ArrowInvalid is a ValueError
                if isinstance(e, KeyError) or "column" in str(e).lower():
                    raise _missing_field(where, fld, columns or []) from e
                raise ValueError(f"error reading {where}: {e}") from e
            for value in batch[fld]:
                yield self._record(value.strip("\n") if trim and value else value, where)

    def _record(self, value: Any, where: str) -> Record:
        if value is None:
            return Record(None, "missing_text")
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors=_ERRORS)
        elif not isinstance(value, str):
            raise ValueError(f"{where}: field {self.text_field!r} holds {type(value).__name__}, not "
                             f"text; point --text-field at a string field")
        if not value.strip():
            return Record(None, "empty")
        if _MARK in value:
            if self.invalid_utf8 == "skip":
                return Record(None, "invalid_utf8")
            return Record(value.replace(_MARK, "\ufffd"), "invalid_utf8")
        return Record(value, None)


def resolve_input(spec: str | os.PathLike, input_format: str | None = None) -> Source:
    """One input string -> its files (sorted, with their formats) or a hub dataset."""
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        return _hub_source(spec, spec[3:])
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(spec, ((str(path.resolve()), _format_of(path, input_format, explicit=True)),))
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        found = _with_formats(files, input_format)
        if not found:
            raise FileNotFoundError(f"folder {spec} holds no data files (known extensions: "
                                    f"{', '.join(EXTENSIONS)}; or name the format with --format)")
        return Source(spec, found)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        found = _with_formats(files, input_format, explicit=True)
        if not found:
            raise FileNotFoundError(f"no files match {spec}")
        return Source(spec, found)
    if _looks_like_path(spec) or not _HUB_NAME.match(spec):
        raise FileNotFoundError(f"input {spec}: no such file or folder")
    return _hub_source(spec, spec)


def _hub_source(spec: str, name: str) -> Source:
    name, _, config = name.partition(":")
    return Source(spec, hub=name, hub_config=config or None)


def _with_formats(files: list[Path], input_format: str | None,
                  explicit: bool = False) -> tuple[tuple[str, str], ...]:
    """Files with known formats; in a folder walk, files of unknown extension are left out."""
    out = []
    for p in files:
        fmt = _format_of(p, input_format, explicit=explicit)
        if fmt is not None:
            out.append((str(p.resolve()), fmt))
    return tuple(out)


def _format_of(path: Path, input_format: str | None, explicit: bool = False) -> str | None:
    if input_format is not None:
        return input_format
    name = path.name.lower()
    for comp in ("", *COMPRESSIONS):
        for ext, fmt in EXTENSIONS.items():
            if name.endswith(ext + comp):
                return fmt
    if explicit:
        raise ValueError(f"{path}: unknown file type; name the format with --format "
                         f"({', '.join(FORMATS)})")
    return None


def _looks_like_path(spec: str) -> bool:
    name = spec.lower()
    parent = os.path.dirname(spec)
    return (spec.startswith(("/", ".", "~")) or (bool(parent) and os.path.isdir(parent))
            or any(name.endswith(ext + comp) for ext in EXTENSIONS for comp in ("", *COMPRESSIONS)))


def _load_hub(src: Source, split: str):
    """Stream a hub dataset, failing fast with a clear message when the hub is unreachable."""
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    what = f"dataset {src.hub!r} (input {src.input!r})"
    if not constants.HF_HUB_OFFLINE:
        # `load_dataset` retries an unreachable hub for ~25 s; one plain request fails at once.
        try:
            HfApi().dataset_info(src.hub, timeout=10)
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"{what} is neither a local path nor a dataset on the Hugging Face "
                                    f"hub (or it is private/gated)") from e
        except HfHubHTTPError as e:
            raise ValueError(f"the Hugging Face hub refused {what}: {e}") from e
        except Exception as e:
            raise HubUnreachable(f"{what} is not a local path and the Hugging Face hub could not be "
                                 f"reached ({type(e).__name__}: {e}); check the network or the path") from e
    try:
        return datasets.load_dataset(src.hub, src.hub_config, split=split, streaming=True)
    except ConnectionError as e:
        raise HubUnreachable(f"{what} is not a local path and the Hugging Face hub could not be "
                             f"reached (offline mode: HF_HUB_OFFLINE is set, and it is not cached): "
                             f"{e}") from e


def _parquet_rows(path: str) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # compressed or damaged: let the builder report it
        return None


def _missing_field(where: str, fld: str, columns: Sequence[str]) -> ValueError:
    return ValueError(f"{where}: no text field {fld!r} (fields: {', '.join(columns) or 'none'}); "
                      f"choose one with --text-field")


def _choice(setting: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {list(allowed)}, got {value!r}")

"""The demo data source: real English from the Python standard library, on every machine.

The corpus is the docstrings of the standard library's source files, read with `ast` (modules
are never imported: some have side effects, e.g. `antigravity` opens a browser). Files go in
sorted order of their path, docstrings in source order; `test`/`tests`/`idlelib`/`lib2to3`/
`site-packages` are skipped, as are docstrings shorter than 200 characters once whitespace is
normalised. Each docstring is one document. A CPython 3.11 standard library holds about 1.14M
characters of such docstrings; if `demo_chars` asks for more, the help topics of
`pydoc_data/topics.py` (the language reference, as strings in a dict) follow, one document each
(about 0.46M more).
Collection stops after the document that reaches `demo_chars`.

`prepare_demo` turns the corpus into a cached entry (built once, atomically):
`<cache>/demo/<key>/` with `tokenizer.model` (sentencepiece, trained on the corpus),
`tokens.npy` (all documents, each followed by EOS), `doc_offsets.npy` (int64 `[D+1]`, where
each document starts) and `meta.json`; it is read back as a memory-mapped `ArraySource`.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import platform
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .array_source import ArraySource
from .cache import build_once, write_json
from .config import DataConfig
from .shards import shard_dtype
from .tokenizer import SentencePieceTokenizer, train_sentencepiece

# Bump when the corpus rules, tokenizer training or the entry's files change: old entries
# then stop matching instead of being read with new assumptions.
VERSION = 2
MIN_DOC_CHARS = 200
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
TOPICS_FILE = "pydoc_data/topics.py"

_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# reST under/overlines ("-----", "*****") carry no words.
_RULE_LINE = re.compile(r"^\s*([-=*~^#+_.:`'\"])\1{2,}\s*$")


@dataclass(frozen=True)
class DemoData:
    """The prepared demo corpus: its documents as a source, its tokenizer, its `meta.json`."""

    source: ArraySource
    tokenizer: SentencePieceTokenizer
    meta: dict


def stdlib_root() -> Path:
    """Directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Standard library `.py` files outside the skipped folders, sorted by relative path."""
    root = root or stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def normalise(text: str) -> str:
    """Collapse whitespace inside paragraphs, keep paragraphs apart with one blank line."""
    paragraphs = []
    for block in _PARAGRAPH_BREAK.split(text):
        words = " ".join(line for line in block.split("\n") if not _RULE_LINE.match(line)).split()
        if words:
            paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs)


def demo_documents(max_chars: int) -> list[str]:
    """The demo corpus: normalised documents, stopping after the one that reaches `max_chars`."""
    root = stdlib_root()
    texts = itertools.chain(
        (doc for path in stdlib_sources(root) for doc in _docstrings(path)),
        _help_topics(root / TOPICS_FILE),
    )
    docs: list[str] = []
    total = 0
    for text in texts:
        doc = normalise(text)
        if len(doc) < MIN_DOC_CHARS:
            continue
        docs.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return docs


def cache_key(cfg: DataConfig) -> str:
    """Name of the cache entry: everything that changes its contents."""
    return (
        f"{sys.implementation.name}{platform.python_version()}"
        f"-chars{cfg.demo_chars}-vocab{cfg.vocab_size}-v{VERSION}"
    )


def prepare_demo(cfg: DataConfig) -> DemoData:
    """The demo documents and tokenizer, built on first use and read from the cache after."""
    entry = cfg.resolved_cache_dir() / "demo" / cache_key(cfg)
    build_once(entry, lambda tmp: _build(cfg, tmp))
    return _load(entry)


def _build(cfg: DataConfig, out: Path) -> None:
    docs = demo_documents(cfg.demo_chars)
    try:
        tokenizer = train_sentencepiece(docs, cfg.vocab_size, out / "tokenizer.model")
    except RuntimeError as e:
        raise ValueError(
            f"training the demo tokenizer failed ({e}); data.vocab_size={cfg.vocab_size} may be "
            f"too large for data.demo_chars={cfg.demo_chars}: lower the one or raise the other"
        ) from e
    ids = tokenizer.encode_batch(docs, add_eos=True)
    n_tokens = sum(map(len, ids))
    tokens = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=shard_dtype(tokenizer.vocab_size), count=n_tokens
    )
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in ids])]).astype(np.int64)
    _save(out / "tokens.npy", tokens)
    _save(out / "doc_offsets.npy", offsets)
    write_json(
        out / "meta.json",
        {
            "source": "demo",
            "version": VERSION,
            "python": f"{sys.implementation.name} {platform.python_version()}",
            "demo_chars": cfg.demo_chars,
            "corpus_chars": sum(map(len, docs)),
            "documents": len(docs),
            "tokens": n_tokens,
            "max_token_id": int(tokens.max()),
            "dtype": tokens.dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint,
        },
    )


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _load(entry: Path) -> DemoData:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        tokenizer = SentencePieceTokenizer(entry / "tokenizer.model")
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        offsets = np.load(entry / "doc_offsets.npy")
        if tokenizer.fingerprint != meta["tokenizer_fingerprint"] or len(tokens) != meta["tokens"] \
                or len(offsets) != meta["documents"] + 1:
            raise ValueError("it does not match its meta.json")
        source = ArraySource(tokens, offsets, name="demo", domain="demo",
                             fingerprint=tokenizer.fingerprint, max_token_id=meta["max_token_id"])
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"demo cache entry {entry} is unreadable ({e}); delete it to rebuild") from e
    return DemoData(source=source, tokenizer=tokenizer, meta=meta)


def _docstrings(path: Path) -> Iterator[str]:
    """Docstrings of one source file in source order (module, classes, functions, nested)."""
    tree = _parse(path)
    if tree is None:
        return
    nodes = sorted(
        (n for n in ast.walk(tree) if isinstance(n, _DEFS)),
        key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)),
    )
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def _help_topics(path: Path) -> Iterator[str]:
    """The topic texts of `pydoc_data/topics.py` (`topics = {name: text, ...}`), in file order."""
    tree = _parse(path)
    if tree is None:
        return
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield value.value


def _parse(path: Path) -> ast.Module | None:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None

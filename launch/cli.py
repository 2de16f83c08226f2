"""What the tool command lines (`convert.py`, `spikes.py`, `quantize.py`) share: a parser whose
`--help` shows every default, and a result printed as a short table for people or, with `--json`,
as one JSON line for machines."""
from __future__ import annotations

import argparse
import json


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, with `--json`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", action="store_true",
                    help="print the result as one JSON line instead of a table")
    return ap


def emit(result: dict, rows: list[tuple[str, object]], as_json: bool) -> None:
    """Print `result` as JSON, or `rows` (label, value) as an aligned two-column table."""
    if as_json:
        print(json.dumps(result), flush=True)
        return
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows), flush=True)


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"

"""How every benchmark reports: the JSON document on stdout and, with --out, the same text in a file written
atomically (a benchmark killed mid-write leaves no half file)."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(doc: dict, out: str | Path | None = None, *, indent: int = 2) -> str:
    text = json.dumps(doc, indent=indent)
    print(text, flush=True)
    if out:
        write_json(doc, out, indent=indent)
    return text


def write_json(doc: dict, out: str | Path, *, indent: int = 2) -> None:
    """The document in `out` only (atomically): for partial results a long benchmark saves as it goes."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n")
    tmp.replace(path)

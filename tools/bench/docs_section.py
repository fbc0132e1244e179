"""Rewrite one delimited section of docs/benchmarks.md, leaving the rest untouched.

Every benchmark script owns a section between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; :func:`write_section` replaces it (or appends it when absent,
creating the file with a ``# Benchmarks`` title when there is none) through a temporary file
and an atomic rename, so two benchmarks finishing together never leave a half-written file.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    """The (begin, end) comment markers of section ``name``."""
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(name: str, text: str, path: Path = DOCS) -> Path:
    """Put ``text`` (markdown, without the markers) into section ``name`` of ``path``.

    Returns the path written."""
    begin, end = markers(name)
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n"  # read just before writing
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return path

"""What commands write: JSON files (atomically) and Markdown tables.

A bottom-level module (standard library only): every layer may import it, the data code and the
benchmarks alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: str | os.PathLike, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, renamed
    into place, so a reader (or a run killed mid-write) never sees half a file. The file gets the
    ordinary permissions of the user's umask. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def cell(x, unit: str = "", nd: int = 2) -> str:
    """A table cell: a number with ``nd`` decimals, a string as is (a status such as 'oom'), or '-'."""
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.{nd}f}{unit}"


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; ``align`` one letter per column, 'l' or 'r' (default: the first column
    left, the others right). Cells are turned into text with ``str`` (format numbers first)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    line = lambda cells: "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"  # an empty cell: "| |"
    return "\n".join([line(header), "|" + "|".join(rule) + "|"] + [line([str(c) for c in row]) for row in rows])

"""Readable, aligned tables for the CLI (no dependency: columns padded to their widest cell)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


def _heading(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", key).upper()


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    cells = [[_heading(c) for c in columns]] + [
        ["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    print(format_table(rows, columns))

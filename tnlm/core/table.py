"""Plain-text tables for summaries and reports."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[str]], left: int = 0) -> list[str]:
    """Lines of a table whose first row is the header, followed by a rule.

    Columns are padded to their widest cell; the first ``left`` columns are
    left-aligned, the others right-aligned.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i < left else v.rjust(w)
                       for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines

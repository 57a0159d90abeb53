"""The tables of the scripts, as Markdown (files) and as rich tables (the console), in one style.

A table is its columns, each ``(heading, "left" | "right")``, and its rows of cells (anything with a
``str``). Used by the benchmarks (scripts/bench, scripts/bench_wakeup.py), scripts/evaluate.py and
scripts/report.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.table import Table

Align = Literal["left", "right"]
Column = tuple[str, Align]


def markdown_table(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table (header, alignment row, rows; no blank line around it); a ``|`` in a
    cell is escaped."""

    def line(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    alignment = "|" + "|".join("---:" if align == "right" else "---" for _, align in columns) + "|"
    return "\n".join([line(heading for heading, _ in columns), alignment, *(line(row) for row in rows)])


def console_table(title: str, columns: Sequence[Column], footers: Sequence[str] | None = None) -> Table:
    """An empty rich table with these columns (and footers, when given), its title on the left; the
    caller adds the rows."""
    # Imported here: rich is only needed by commands that print tables.
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_footer=footers is not None)
    for index, (heading, align) in enumerate(columns):
        table.add_column(heading, justify=align, footer=footers[index] if footers is not None else "")
    return table

"""Tables that stay readable in any terminal width and in a pipe (`mauctl presets`, `mauctl report`).

A command prints its wide table only when the table fits the console as it is; otherwise it
prints a narrow layout of the same content. Rich would rather squeeze a wide table, cutting loss
names and run paths to "…" and wrapping sentences a word per line. In a pipe or a file rich has
no terminal to ask: it takes $COLUMNS, else 80.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def fits(console: Console, renderable: RenderableType) -> bool:
    """Whether ``renderable`` fits the console at its natural width (a column's ``max_width`` included),
    so that rich need not squeeze it."""
    unbounded = console.options.update_width(100_000)
    return Measurement.get(console, unbounded, renderable).maximum <= console.width


def has_styles(console: Console) -> bool:
    """False in a pipe or a file, where rich prints no bold, so bold alone marks nothing."""
    return console.color_system is not None


def emphasised(text: str, console: Console) -> Text:
    """Bold in a terminal; ``**text**`` (markdown's bold, as the report's markdown has it) without styles."""
    return Text(text, style="bold") if has_styles(console) else Text(f"**{text}**")


def emphasis_name(console: Console) -> str:
    """What a legend calls the mark `emphasised` gives."""
    return "bold" if has_styles(console) else "**bold**"


def paragraph(console: Console, text: str | Text) -> None:
    """Print prose wrapped at word boundaries, even on a soft-wrapping console (the CLI's)."""
    console.print(text, markup=False, highlight=False, soft_wrap=False)


def bullets(items: Iterable[str], indent: int = 2) -> Group:
    """One line per item after a dash; a long item wraps under its own first word, not under the dash."""
    lines = []
    for item in items:
        line = Table.grid(padding=(0, 1))  # one grid per item, so short items get no trailing spaces
        line.add_column(width=indent + 1, justify="right", no_wrap=True)
        line.add_column()
        line.add_row("-", Text(item))
        lines.append(line)
    return Group(*lines)

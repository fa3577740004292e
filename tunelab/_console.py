"""Console output shared by the CLI and the reports: a rich console at the terminal's width, and tables
whose column names are never cut (cells fold onto more lines instead)."""

from __future__ import annotations

import os
import sys


def console():
    """A rich console at the terminal's width; ``COLUMNS`` wide, else 240 columns, when the output is not a
    terminal (a pipe or a file), so ids and paths are never cut there."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 240)


def table(*headers: str, title: str | None = None, right: tuple[str, ...] = (), **kw):
    """A rich Table whose columns are at least as wide as their names' longest word and fold long cells,
    so a narrow terminal wraps cells instead of truncating column names. ``right``: right-aligned columns."""
    from rich.table import Table

    t = Table(title=title, **kw)
    for h in headers:
        t.add_column(h, justify="right" if h in right else "left", overflow="fold",
                     min_width=max((len(w) for w in h.split()), default=1))
    return t


def show(con, t) -> None:
    """Print table ``t`` on ``con``: as a table where its columns fit the width without cutting a name,
    else one block per row (``name: value`` lines), which fits any width."""
    from rich.table import Table

    if _fits(con, t):
        con.print(t)
        return
    if t.title:
        con.print(t.title, style="bold")
    rows = list(zip(*(list(c.cells) for c in t.columns)))
    for i, row in enumerate(rows):
        block = Table.grid(padding=(0, 1))
        block.add_column(style="bold", overflow="fold")
        block.add_column(overflow="fold")
        for c, v in zip(t.columns, row):
            block.add_row(str(c.header) or " ", v)
        con.print(block)
        if i < len(rows) - 1:
            con.print("")


def _fits(con, t) -> bool:
    """Whether ``t`` renders at ``con``'s width with its right border (rich crops a table whose columns'
    minimum widths do not fit, cutting the last column's name)."""
    import io

    from rich.console import Console

    if t.box is None:
        return True
    probe = Console(width=con.width, file=io.StringIO(), record=True, color_system=None)
    t_title, t.title = t.title, None
    try:
        probe.print(t)
    finally:
        t.title = t_title
    first = probe.export_text().splitlines()[0].rstrip()
    return first.endswith(t.box.top_right) or first.endswith(t.box.head_row_right)

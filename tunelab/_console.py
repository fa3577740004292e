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


def progress(items, desc: str, unit: str = "ex", **kw):
    """A tqdm bar on stderr over ``items`` (an iterable to wrap, or the count of a bar updated by hand). At a terminal it redraws in place; in a pipe or a log file (a platform job's log)
    each update it shows is a line of its own (no carriage returns), at most one every
    ``TUNELAB_PROGRESS_INTERVAL`` seconds (default 5; 0: every update, as the tests read it)."""
    from tqdm.auto import tqdm

    if items is None or isinstance(items, int):
        kw["total"] = items
    else:
        kw["iterable"] = items
        kw.setdefault("total", len(items) if hasattr(items, "__len__") else None)
    if sys.stderr.isatty():
        return tqdm(desc=desc, unit=unit, dynamic_ncols=True, **kw)
    try:
        every = float(os.environ.get("TUNELAB_PROGRESS_INTERVAL", "5"))
    except ValueError:
        every = 5.0
    return tqdm(desc=desc, unit=unit, file=_Lines(sys.stderr), ncols=100, mininterval=every,
                maxinterval=max(every, 10.0), miniters=1 if every <= 0 else None, **kw)


def status(message: str) -> None:
    """One line on stderr saying what a phase does (and how many items), before work that has no bar."""
    print(message, file=sys.stderr, flush=True)


class _Lines:
    """A file for tqdm that writes each redraw as its own line, for output that is not a terminal."""

    def __init__(self, f):
        self.f = f
        self.last = ""

    def write(self, s: str) -> None:
        for part in s.replace("\n", "\r").split("\r"):
            part = part.rstrip()
            if part and part != self.last:
                self.f.write(part + "\n")
                self.last = part

    def flush(self) -> None:
        self.f.flush()

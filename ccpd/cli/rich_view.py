"""``ccp status`` on a terminal, and ``ccp status --watch``: the same figures as the plain
renderer of :mod:`ccpd.cli` (the same cell functions), laid out with ``rich``: a table that fits
the terminal's width, the state coloured, and a Live view refreshed in place.

Only loaded for a terminal: piped output, ``--json`` and ``ccp statusline`` never import rich,
and the plain text they print stays what it was.
"""
from __future__ import annotations

import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ccpd.cli import (_columns, _obj, _rolling_title, format_debug, format_header,
                      format_lanes)

STATE_STYLES = {"OK": "green", "WARN": "yellow", "BLOCK": "bold red"}


def make_console(colour: bool) -> Console:
    return Console(no_color=not colour, highlight=False, emoji=False)


def status_renderable(body: dict, speeds: bool = False, debug: bool = False,
                      url: str | None = None, width: int | None = None):
    """The whole ``ccp status`` view of a ``/v1/usage`` body as one rich renderable, for a
    terminal ``width`` columns wide."""
    body = _obj(body)
    models = {str(k): v for k, v in _obj(body.get("models")).items()}
    parts = [Text(format_header(body, url), style="bold"), Text("")]
    if not models:
        parts.append(Text("no models seen yet"))
        return Group(*parts)
    cols = _columns(speeds, _rolling_title(models))
    rows = [[fn(name, _obj(models[name])) for _, _, fn in cols] for name in sorted(models)]
    # two spaces between columns, as in the plain table: the box's blank separator and one
    # space of padding on the right
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="bold")
    # where the terminal is narrower than the table, the titles wrap ("OUT t/s" over
    # "STREAM") and the figures keep their width; only a terminal too narrow for the figures
    # themselves has rich fold them
    natural = [max([len(row[i]) for row in rows] + [len(title)])
               for i, (title, _, _) in enumerate(cols)]
    compact = [max([len(row[i]) for row in rows] + [len(word) for word in title.split()])
               for i, (title, _, _) in enumerate(cols)]
    gaps = 2 * (len(cols) - 1)
    fixed = (width is not None and sum(natural) + gaps > width
             and sum(compact) + gaps <= width)
    for i, (title, right, _) in enumerate(cols):
        table.add_column(title, justify="right" if right else "left", overflow="fold",
                         width=compact[i] if fixed else None)
    state_col = [title for title, _, _ in cols].index("STATE")
    for cells in rows:
        cells[state_col] = Text(cells[state_col], style=STATE_STYLES.get(cells[state_col], ""))
        table.add_row(*cells)
    parts.append(table)
    lanes = format_lanes(_obj(body.get("lanes")))
    if lanes:
        text = Text(lanes)
        text.highlight_words(["REJECTED", "UNUSABLE"], style="bold red")
        parts += [Text(""), Text("lanes (what the providers report):", style="bold"), text]
    if debug:
        parts += [Text(""), Text("quota policy:", style="bold"), Text(""),
                  Text(format_debug(models))]
    return Group(*parts)


def print_status(body: dict, speeds: bool, debug: bool, url: str, colour: bool) -> None:
    console = make_console(colour)
    console.print(status_renderable(body, speeds=speeds, debug=debug, url=url,
                                    width=console.width))


def watch(fetch, interval: float, speeds: bool, debug: bool, url: str, colour: bool,
          sleep=time.sleep) -> None:
    """Refresh the view every ``interval`` seconds until KeyboardInterrupt (which the caller
    turns into a clean exit). ``fetch()`` returns a usage body or raises ``CliError``; a
    failed refresh shows its message above the last good answer instead of ending the watch."""
    from ccpd.cli import CliError

    last = None
    count = 0

    def render():
        nonlocal last, count
        error = None
        try:
            last = fetch()
        except CliError as e:
            error = e.message
        count += 1
        parts = []
        if error:
            parts += [Text(error, style="bold red")]
            if last is not None:
                parts += [Text("(last answer below)", style="dim"), Text("")]
        if last is not None:
            parts.append(status_renderable(last, speeds=speeds, debug=debug, url=url,
                                           width=console.width))
        parts += [Text(""), Text(f"refresh {count} · every {interval:g}s · "
                                 f"{time.strftime('%H:%M:%S')} · Ctrl-C to quit",
                                 style="dim")]
        return Group(*parts)

    console = make_console(colour)
    with Live(render(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            sleep(interval)
            live.update(render(), refresh=True)

"""Progress of long work: tqdm's bar on a terminal; anywhere else (a log file, CI, nohup) one plain
line every LOG_EVERY seconds, so a log shows the job is alive, how far it is and how fast it goes.
Work shorter than LOG_EVERY prints nothing there. Callers update postfixes with refresh=False, so
only the bar decides when to print."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

LOG_EVERY = 15.0  # seconds between progress lines when stderr is not a terminal


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = "it", total: int | None = None,
             initial: int = 0, enabled: bool = True) -> Any:  # fmt: skip
    """A tqdm bar (iterate it, or call .update) that also reports to logs."""
    from tqdm import tqdm

    common = dict(total=total, initial=initial, desc=desc, unit=unit)
    if not enabled:
        return tqdm(iterable, disable=True, **common)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **common)
    fmt = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}"
    if total is None and not hasattr(iterable, "__len__"):
        fmt = "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}{postfix}"
    return tqdm(iterable, file=_Lines(sys.stderr), delay=LOG_EVERY, mininterval=LOG_EVERY, bar_format=fmt, **common)


class _Lines:
    """A stream for tqdm off a terminal: each redraw (a carriage return and the status) becomes one line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()

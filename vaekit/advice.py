"""Advice in an error names what the caller can change: the Python argument (`overwrite=True`) when vaekit is
called from Python, the flag (`--overwrite`) when it runs as `vaekit <command>`, which sets `FLAGS` for the
command's run. The library's messages stay in one place and read right to both."""

from __future__ import annotations

from contextvars import ContextVar

FLAGS: ContextVar[bool] = ContextVar("vaekit_advice_in_flags", default=False)


def option(name: str, value: object = True) -> str:
    """`option("store", "both")` is "store='both'" from Python and "--store both" from the command line."""
    if not FLAGS.get():
        return f"{name}={value!r}"
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"

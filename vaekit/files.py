"""Writing files without losing any: every file vaekit writes goes through `write_atomic`, and the
commands that write next to a user's files follow `check_targets`: never over an input, never over
an existing file unless told, and output folders carry a marker so image searches skip them."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable, Iterable

# In every folder vaekit writes images into (reconstructions, run folders, reports). Searching for
# images skips folders below the searched one that hold it, so outputs never come back as inputs.
OUTPUT_MARKER = ".vaekit-output"


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) then rename tmp to path, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mark_output_folder(folder: Path, what: str) -> None:
    """Create `folder` and mark it as vaekit's output (`what` says which command wrote it)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text(f"written by {what}; vaekit skips this folder when it searches for images\n")


def check_targets(targets: Iterable[Path], inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before any work: a target that is one of the inputs (always), a target that is a
    folder, and a target that exists (unless `overwrite`). The message names the first and the count."""
    targets = list(targets)
    for folder in {t.parent for t in targets}:
        check_writable(folder)
    given = {p.resolve() for p in inputs}
    for bad, what in (
        ([t for t in targets if t.resolve() in given], "is one of the inputs: choose an output that is not among them"),
        ([t for t in targets if t.is_dir()], "is a folder where a file would be written: choose another output"),
        ([t for t in targets if t.exists()] if not overwrite else [], "already exists: pass --overwrite to replace it, or choose another output"),
    ):  # fmt: skip
        if bad:
            more = f" (and {len(bad) - 1} more of the {len(targets)} files to write)" if len(bad) > 1 else ""
            raise ValueError(f"{bad[0]}{more} {what}")


def check_output_folder(folder: Path, flag: str) -> None:
    """A folder vaekit fills with files of its own naming (a run, a report, reconstructions) must be new,
    empty, or one vaekit wrote (it or a folder above holds OUTPUT_MARKER), so nothing of the user's is
    ever replaced in it."""
    if folder.is_file():
        raise ValueError(f"{flag} {folder} is a file: give a folder")
    ours = any((f / OUTPUT_MARKER).exists() for f in [folder, *folder.resolve().parents])  # or inside such a folder
    if folder.is_dir() and not ours and any(folder.iterdir()):
        raise ValueError(f"{flag} {folder} already holds files that vaekit did not write: choose a new or empty folder")
    check_writable(folder)


def check_writable(folder: Path) -> None:
    """Fail before any work, with an OSError naming the path, if `folder` cannot be created or written
    (part of its path is a file, or the nearest existing folder is not writable)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))

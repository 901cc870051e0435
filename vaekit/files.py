"""Writing files without losing any: every file vaekit writes goes through `write_atomic`, and the
commands that write next to a user's files follow `check_targets`: never over an input, never over
an existing file unless told, and output folders carry a marker so image searches skip them."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from .advice import option

# In every folder vaekit writes images into (reconstructions, run folders, reports). Searching for
# images skips folders below the searched one that hold it, so outputs never come back as inputs.
OUTPUT_MARKER = ".vaekit-output"


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) then rename tmp to path, so a crash never leaves a half-written file. The file gets
    the permissions the user's umask gives new files (safetensors alone would create it 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o22)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def safe_name(name: str) -> PurePosixPath:
    """A name taken from a source (a tar member, a manifest line, a tensor key) as a relative path that stays
    inside the folder it is joined to: `.` parts dropped; absolute names, `..` and empty names refused, so a
    downloaded shard can never make vaekit write outside its output folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or name.startswith(("/", "\\")) or ".." in parts or parts[0][1:] == ":":  # (C: on Windows)
        raise ValueError(f"{name!r} is not a safe relative name (absolute, empty or with '..'): it could point outside the output folder")
    return PurePosixPath(*parts)


def output_names(names: list[PurePosixPath], suffix: str = ".png") -> list[PurePosixPath]:
    """Output names for inputs named `names` (relative paths): each with `suffix`; when two would share a name
    (x.jpg and x.png), those not already named so keep their whole name plus the suffix (x.jpg.png), so no
    output replaces another."""
    wanted = [n.with_suffix(suffix) for n in names]
    shared = {w for w, k in Counter(wanted).items() if k > 1}
    out = [n.with_name(n.name + suffix) if w in shared and n != w else w for n, w in zip(names, wanted)]
    clash = next((n for n, k in Counter(out).items() if k > 1), None)
    if clash is not None:
        raise ValueError(f"two inputs would both be written to {clash}; rename one of them")
    return out


def mark_output_folder(folder: Path, what: str) -> None:
    """Create `folder` and mark it as vaekit's output (`what` says which command wrote it)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text(f"written by {what}; vaekit skips this folder when it searches for images\n")


def check_targets(targets: Iterable[Path], inputs: Iterable[Path], overwrite: bool, inside: Path | None = None) -> None:
    """Refuse, before any work: a target outside the folder `inside` (when given: outputs named after inputs,
    through a link or otherwise), a target that is one of the inputs (always), a target that is a folder, and a
    target that exists (unless `overwrite`). The message names the first and the count."""
    targets = list(targets)
    for folder in {t.parent for t in targets}:
        check_writable(folder)
    given = {p.resolve() for p in inputs}
    root = inside.resolve() if inside is not None else None
    for bad, what in (
        ([t for t in targets if not t.resolve().is_relative_to(root)] if root else [], f"is outside the output folder {inside}: refused"),
        ([t for t in targets if t.resolve() in given], "is one of the inputs: choose an output that is not among them"),
        ([t for t in targets if t.is_dir()], "is a folder where a file would be written: choose another output"),
        ([t for t in targets if t.exists()] if not overwrite else [], f"already exists: pass {option('overwrite')} to replace it, or choose another output"),
    ):  # fmt: skip
        if bad:
            more = f" (and {len(bad) - 1} more of the {len(targets)} files to write)" if len(bad) > 1 else ""
            raise ValueError(f"{bad[0]}{more} {what}")


@contextlib.contextmanager
def output_folder(folder: Path, what: str) -> Iterator[Path]:
    """Mark `folder` as vaekit's output for the work inside the block; if the block fails and the folder was
    made here and holds nothing but the marker, remove it again (a failed command leaves no empty folder)."""
    made = not folder.exists()
    mark_output_folder(folder, what)
    try:
        yield folder
    except BaseException:
        if made and [p.name for p in folder.iterdir()] == [OUTPUT_MARKER]:
            shutil.rmtree(folder, ignore_errors=True)
        raise


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

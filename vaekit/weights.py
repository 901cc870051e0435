"""Pretrained weights that metrics and losses need (LPIPS backbones, FID's Inception), kept where
torch itself keeps them: `$TORCH_HOME/hub/checkpoints/`. Offline, one line says which file goes where."""

from __future__ import annotations

from pathlib import Path

import torch


class MissingWeights(FileNotFoundError):
    """A weights file that is neither cached nor downloadable. Its text says which file goes where;
    `message(otherwise)` says it with a command's own way to go on without it."""

    def __init__(self, needed_by: str, path: Path, url: str, reason: str, otherwise: str):
        self.needed_by, self.path, self.url, self.reason = needed_by, path, url, reason
        super().__init__(self.message(otherwise))

    def message(self, otherwise: str) -> str:
        return (f"{self.needed_by} needs the weights file {self.path.name} and could not download it ({self.reason}): put "
                f"{self.path.name} (from {self.url}) into {self.path.parent}/ (set TORCH_HOME to use another folder), or {otherwise}")


def fetch_weights(url: str, needed_by: str, otherwise: str) -> Path:
    """The cached file for `url`, downloaded if missing (hash-checked when its name carries one).

    `needed_by` names what wants it ("LPIPS (vgg)"), `otherwise` how to go on without it."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise MissingWeights(needed_by, path, url, " ".join(str(e).split()) or type(e).__name__, otherwise) from None
    return path

"""Making previews of a teacher's latent space (`vaekit distill`, docs/PREVIEWS.md): the linear preview fitted by
least squares, and a tiny autoencoder trained on the trainer to speak the teacher's `to_latent` space.

A preview decodes what a diffusion model sees, the teacher's normalised latents, so both are fitted there, against
the teacher's own decode: a preview shows what the teacher will draw. The linear preview is ComfyUI's
`latent_rgb_factors` (a row of R, G, B per latent channel) and `latent_rgb_factors_bias`, applied at latent
resolution and upsampled bilinearly. The tiny autoencoder's decoder starts as that fitted preview (a linear skip
beside a zero-initialised network) and learns what it misses; its encoder learns the teacher's `to_latent`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import center_crop, held_out_sets, iter_images, to_tensor, to_uint8, with_alpha
from .evaluate import PSNR_CAP
from .latents import LatentDataset
from .metrics import colour_error, psnr, ssim
from .model import Autoencoder
from .previews import linear_preview, preview_model
from .progress import progress as progress_bar

LINEAR_FIT_SIDE = 256  # images are fitted at this side (the shorter side resized, centre square)
LINEAR_FIT_IMAGES = 32  # at most this many images: 65k pixels each at 256², ample for C+1 unknowns
CLAMP_RMS = 2.0  # latents beyond this RMS lose much to taesd's soft clamp 3 tanh(z / 3) (fit_linear_preview warns)


def teacher_pairs(teacher: Autoencoder, images: Iterable[Tensor]) -> Iterable[tuple[Tensor, Tensor]]:
    """(normalised latent, teacher's decode of it) per image: what a preview is fitted to."""
    with torch.no_grad():
        for x in images:
            z = teacher.to_latent(x.to(teacher.device, teacher.dtype))
            yield z.float(), teacher.from_latent(z).float().clamp(-1, 1)


def fit_linear_preview(teacher: Autoencoder, data: str, limit: int = LINEAR_FIT_IMAGES, side: int = LINEAR_FIT_SIDE,
                       progress: bool = True) -> tuple[Autoencoder, int]:  # fmt: skip
    """The least-squares linear preview of `teacher` (`vaekit.previews.linear_preview`: ComfyUI's latent_rgb_factors
    and bias), against its decode of each of the first `limit` images of `data` (shorter side resized to `side`,
    centre square), and how many images it saw. Fitted as the preview draws: the latent upsampled bilinearly to the
    image, then the linear map (the two commute, so exactly the preview's error is minimised). Normal equations in
    float64: one encode and one decode per image."""
    grid = teacher.factor * (2 if teacher.config.latent_norm == "patch_bn" else 1)
    side = max(grid, side // grid * grid)
    xtx, xty, n = None, None, 0
    crops = (to_tensor(center_crop(teacher_image(image, teacher), side)) for _, image in islice(iter_images(data), limit))
    for z, decoded in progress_bar(teacher_pairs(teacher, crops), desc="fit linear preview", unit="img", total=limit,
                                   enabled=progress):  # fmt: skip
        up = upsampled(z, teacher, decoded.shape[-2:])
        a = torch.cat([up, torch.ones_like(up[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, up.shape[1] + 1).double()
        b = decoded.permute(0, 2, 3, 1).reshape(-1, decoded.shape[1]).double()
        xtx = a.T @ a if xtx is None else xtx + a.T @ a
        xty = a.T @ b if xty is None else xty + a.T @ b
        n += 1
    if xtx is None:
        raise ValueError(f"{data} holds no readable image to fit a linear preview on")
    rms = (torch.diagonal(xtx)[:-1] / xtx[-1, -1]).sqrt().max().item()  # the largest channel's RMS (A^T A holds the sums)
    if rms > CLAMP_RMS:
        warnings.warn(f"the teacher's normalised latents reach an RMS of {rms:.1f} on {data}, where a tiny autoencoder's decoder "
                      "soft-clamps them to (-3, 3) and loses most of them: give the teacher a unit-variance normalisation "
                      "first (vaekit calibrate TEACHER DATA --write CALIBRATED), as its diffusion model should see it too")  # fmt: skip
    # A whisper of ridge keeps a rank-deficient space (a dead channel) solvable without moving a full-rank fit.
    ridge = 1e-8 * torch.trace(xtx) / xtx.shape[0]
    w = torch.linalg.solve(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty).float()
    return linear_preview(w[:-1], w[-1], teacher), n


def upsampled(z: Tensor, teacher: Autoencoder, size: tuple[int, int]) -> Tensor:
    """Normalised latents as a linear preview reads them: FLUX.2's 2x2 patches unpacked (128 -> 32 channels at 1/8,
    as ComfyUI's factors for it), then bilinearly upsampled to the image."""
    if teacher.config.latent_norm == "patch_bn":
        z = F.pixel_shuffle(z, 2)
    return F.interpolate(z, size=tuple(size), mode="bilinear", align_corners=False)


def hand_set_preview(teacher: Autoencoder) -> Autoencoder:
    """The preview people set by hand when nothing else exists: the first three latent channels as R, G, B (an RGBA
    teacher's alpha opaque)."""
    model = preview_model(teacher, linear=True)
    weight, bias = model.decoder.conv_out.weight, model.decoder.conv_out.bias  # (out, latent, 1, 1), zeros
    with torch.no_grad():
        for c in range(min(3, weight.shape[1])):
            weight[c, c] = 1.0
        bias[3:] = 1.0  # alpha, if any: opaque
    return model


def teacher_image(image: np.ndarray, teacher: Autoencoder) -> np.ndarray:
    """An image as the teacher reads it: RGBA for a 4-channel model (opaque when the file has no alpha), else RGB."""
    return with_alpha(image) if teacher.config.rgba else image[..., :3]


# ---- distilling a tiny autoencoder (the trainer runs it: vaekit.train with TrainConfig.distill) ----------------


@dataclass
class DistillConfig:
    """What makes a training run a distillation: the teacher, and what the student learns from it. Fields with a
    "help" are `vaekit distill` flags (group "distill"), generated as train's are."""

    teacher: str = ""  # the teacher MODEL (anything vaekit.load reads); `vaekit distill`'s first argument
    target: Literal["teacher", "images", "both"] = field(default="teacher", metadata={"group": "distill", "help":
        "what the preview decoder reproduces from the teacher's latents: the teacher's own decode (a preview of what "
        "the teacher will draw), the images, or both (their mean image)"})  # fmt: skip
    latent_weight: float = field(default=1.0, metadata={"group": "distill", "help":
        "weight of the encoder's loss: mean squared distance to the teacher's normalised latent (to_latent)"})  # fmt: skip
    fit_images: int = field(default=LINEAR_FIT_IMAGES, metadata={"group": "distill", "help":
        "how many images of DATA the linear preview is fitted on (at 256x256): the decoder's start, and the preview the "
        "run is compared with at the end"})  # fmt: skip
    latents: str = field(default="", metadata={"group": "distill", "metavar": "LATENTS", "help":
        "train on a latent dataset the teacher already encoded (`vaekit encode TEACHER DATA LATENTS`): random latent "
        "crops of it, decoded by the teacher for the target, instead of encoding image crops at each step (DATA still "
        "fits the linear preview and validates); --target teacher only"})  # fmt: skip
    linear_skip: bool = field(default=True, metadata={"group": "distill", "negatable": True, "help":
        "start the decoder from the linear preview fitted on DATA and learn what it misses (a linear path beside the "
        "network; RUN/model.safetensors is vaekit's file); --no-linear-skip trains taesd's plain network, which "
        "taesd.py and diffusers' AutoencoderTiny load too (RUN/model, or vaekit convert --format pair)"})  # fmt: skip

    def __post_init__(self) -> None:
        if self.target not in ("teacher", "images", "both"):
            raise ValueError(f"target must be teacher, images or both, got {self.target!r}")
        if self.fit_images < 1:
            raise ValueError(f"fit_images must be at least 1, got {self.fit_images}")
        if self.latent_weight < 0:
            raise ValueError(f"latent_weight must be at least 0, got {self.latent_weight}")
        if self.latents and self.target != "teacher":
            raise ValueError(f"--latents gives the teacher's latents, not the images they came from: --target {self.target} "
                             "needs image crops (leave out --latents, or use --target teacher)")  # fmt: skip


class DistillForward(nn.Module):
    """The training forward of a distillation: the teacher's normalised latent of each crop (no gradient), the
    student's decode of it, the target it is scored against, and the student encoder's distance to that latent.

    The student's latent normalisation is the identity (its space is the teacher's `to_latent`), so `decode`
    takes the teacher's latents as they are."""

    def __init__(self, student: Autoencoder, teacher: Autoencoder, config: DistillConfig):
        super().__init__()
        self.student, self.config = student, config
        self.__dict__["teacher"] = teacher  # not a submodule: DDP, .parameters() and checkpoints leave it out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(student's decode, target, latent loss or None) for images `x` in [-1, 1], or, with `config.latents`, for
        the teacher's normalised latents `x` (the teacher's decode then stands in for the image the encoder reads)."""
        with torch.no_grad():
            z = x if self.config.latents else self.teacher.to_latent(x)
            decoded = self.teacher.from_latent(z).clamp(-1, 1) if self.config.target != "images" else None
            if self.config.latents:
                x = decoded
        target = {"teacher": decoded, "images": x}.get(self.config.target)
        if target is None:  # both: halfway between what the teacher draws and the photo
            target = 0.5 * (x + decoded)
        recon = self.student.decode(z)
        latent_loss = None
        if self.student.encoder is not None and self.config.latent_weight > 0 and any(
            p.requires_grad for p in self.student.encoder.parameters()
        ):
            latent_loss = F.mse_loss(self.student.encode(x).mode().float(), z.float())
        return recon, target, latent_loss


class LatentCrops(Dataset):
    """Random square crops of a teacher's latent dataset (`vaekit encode`), normalised as the teacher's `to_latent`:
    `--latents`' training data. Keyed by `vaekit.data.StreamSampler`'s (index, seed), as image crops are, so a
    resumed run draws the same crops."""

    def __init__(self, root: str, teacher: Autoencoder, side: int):
        self.latents = LatentDataset(root, model=teacher)  # refuses a dataset another model's weights encoded
        self.side = side
        # Checked here, not in a loader worker (whose error would come back wrapped in a traceback).
        _, factor = teacher.config.normalised_shape
        default = [self.latents.info["resolution"]] * 2  # items of datasets made before buckets: the square target
        for item in self.latents.items:
            h, w = (d // factor for d in item.get("bucket") or default)
            if min(h, w) < side:
                raise ValueError(f"{root}: {item.get('source')}'s latent is {h}x{w}, smaller than the {side}x{side} latent "
                                 "crops --resolution asks for: lower --resolution")  # fmt: skip

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> tuple[Tensor, list[str]]:
        index, seed = key
        z = self.latents[index]["latent"]
        h, w = z.shape[-2:]
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(h - self.side + 1)), int(rng.integers(w - self.side + 1))
        return z[:, top : top + self.side, left : left + self.side].contiguous(), []


# ---- how good a preview is -------------------------------------------------------------------------------------


@torch.no_grad()
def against_teacher(previews: dict[str, Autoencoder], teacher: Autoencoder, images: Sequence[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """How well each of `previews` decodes `teacher`'s latents of `images` (the teacher runs once per image): PSNR/SSIM
    against the teacher's own decode (what a preview is for), the same PSNR at latent resolution (`psnr_teacher_small`:
    both averaged over each latent pixel's patch, where a linear preview is at its best) and PSNR against the
    originals, and the largest mean-colour shift from the teacher's decode (levels, `vaekit.metrics.colour_error`:
    previews "too dark or too saturated" show here), each image's and the worst; by the previews' names."""
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in previews}
    for name, image in images:
        z = teacher.to_latent(to_tensor(teacher_image(image, teacher)).to(teacher.device))
        drawn = to_uint8(teacher.from_latent(z))[0][..., :3]
        for label, preview in previews.items():
            shown = to_uint8(preview.from_latent(z.to(preview.device)))[0][..., :3]
            rows[label].append({"name": name, "psnr_teacher": min(float(psnr(shown, drawn)), PSNR_CAP), "ssim_teacher": float(ssim(shown, drawn)),
                                "psnr_teacher_small": min(_psnr_small(shown, drawn, teacher.factor), PSNR_CAP),
                                "psnr": min(float(psnr(shown, image[..., :3])), PSNR_CAP), "colour_shift": float(colour_error(shown, drawn))})  # fmt: skip
    return {label: _summary(per_image) for label, per_image in rows.items()}


def _summary(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(per_image, key=lambda r: r["colour_shift"])
    mean = lambda key: float(np.mean([r[key] for r in per_image]))  # noqa: E731
    return {"n": len(per_image), "psnr_teacher": mean("psnr_teacher"), "ssim_teacher": mean("ssim_teacher"),
            "psnr_teacher_small": mean("psnr_teacher_small"), "psnr": mean("psnr"),
            "colour_shift": worst["colour_shift"], "worst_colour_image": worst["name"], "per_image": per_image}  # fmt: skip


def _psnr_small(a: np.ndarray, b: np.ndarray, factor: int) -> float:
    """PSNR of two HxWx3 uint8 images after averaging each over factor x factor patches (in float: no rounding)."""
    small = [F.avg_pool2d(torch.from_numpy(x).permute(2, 0, 1).double()[None], factor) for x in (a, b)]
    return float(10 * torch.log10(255.0**2 / (small[0] - small[1]).square().mean()))


def held_out_against_teacher(preview: Autoencoder, teacher: Autoencoder, linear: Autoencoder | None = None,
                             resolution: int = 256) -> dict[str, Any]:  # fmt: skip
    """`against_teacher` on each of `vaekit.data.held_out_sets` (photos, native-resolution crops, saturated colours),
    the `linear` preview's beside it (under "linear") when given."""
    out = {}
    for kind, images in held_out_sets(resolution).items():
        scores = against_teacher({"preview": preview, **({"linear": linear} if linear is not None else {})}, teacher, images)
        out[kind] = scores["preview"]
        if linear is not None:
            out[kind]["linear"] = {k: v for k, v in scores["linear"].items() if k != "per_image"}
    return out

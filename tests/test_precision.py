"""Half precision on CPU: fp16 and bf16 run (untiled and tiled) close to fp32, and an fp16 model whose
activations overflow (the SDXL-VAE NaN problem) still returns finite output, recomputed in fp32 with
a one-time warning."""

import copy
import warnings

import pytest
import torch
from skimage import data as skdata

from vaekit.data import to_tensor
from vaekit.model import autoencoder

OVERFLOW = "fp16 activations overflowed"


@pytest.fixture
def image() -> torch.Tensor:
    return to_tensor(skdata.astronaut()[::8, ::8].copy())  # 1x3x64x64 photo


@pytest.fixture
def fresh_warnings(monkeypatch) -> None:
    """Forget which one-time warnings were already shown (by other tests in this process)."""
    monkeypatch.setattr(autoencoder, "_warned", set())


# Largest differences from fp32 measured on the tiny model (64x64 photos, untiled and tile 32):
# fp16 encode 0.0034 / decode 0.0091, bf16 encode 0.028 / decode 0.081. Tolerances are ~2x those.
@pytest.mark.parametrize("dtype, enc_tol, dec_tol", [(torch.float16, 0.01, 0.025), (torch.bfloat16, 0.06, 0.15)])
def test_half_precision_close_to_fp32(tiny_model, image, fresh_warnings, dtype, enc_tol, dec_tol):
    with torch.no_grad():
        latent = tiny_model.encode(image).mean
        reference = tiny_model.decode(latent)
        half = copy.deepcopy(tiny_model).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fp32 fallback: it really ran in `dtype`
            for tile in (None, 32):
                mean = half.encode(image, tile=tile).mean
                out = half.decode(latent, tile=tile)
                assert mean.dtype == out.dtype == dtype
                assert (mean.float() - latent).abs().max() <= enc_tol
                assert (out.float() - reference).abs().max() <= dec_tol


def test_fp16_overflow_recomputes_in_fp32_with_one_warning(tiny_model, image, fresh_warnings):
    loud = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for conv in (loud.encoder.conv_in, loud.decoder.conv_in):
            conv.weight.mul_(1e5)  # activations ~1e5, past fp16's 65504
        latent = loud.encode(image).mean
        reference = loud.decode(latent)
        half = copy.deepcopy(loud).half()
        # It does overflow in fp16 (encoder and decoder alike)...
        assert not torch.isfinite(half.encoder(image.half())).all()
        assert not torch.isfinite(half.decoder(latent.half())).all()
        # ...and encode/decode still give finite results, close to fp32 (measured 8e-4 and 1.8e-3:
        # fp16 rounding of the fp32 result), warning once for all calls, tiled ones included.
        with pytest.warns(RuntimeWarning, match=OVERFLOW):
            mean = half.encode(image).mean
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            out = half.decode(latent)
            tiled = half.encode(image, tile=32).mean
    assert not [w for w in later if OVERFLOW in str(w.message)]
    assert mean.dtype == out.dtype == tiled.dtype == torch.float16
    assert (mean.float() - latent).abs().max() <= 5e-3
    assert (tiled.float() - latent).abs().max() <= 5e-3
    assert (out.float() - reference).abs().max() <= 1e-2
    assert half.dtype == torch.float16  # the fallback puts the weights back

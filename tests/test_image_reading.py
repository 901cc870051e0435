"""read_image and image_size: EXIF orientation, reduced-scale JPEG decoding, the decompression-bomb limit."""

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from vaekit.data import (
    MAX_PIXELS, REDUCE_BOUND, REDUCE_MARGIN, ImageTooLarge, image_size, read_image, sample_images, synthetic_colours,
)  # fmt: skip
from vaekit.latents import fit

# What each EXIF orientation asks of the stored pixels to show them upright (EXIF 2.3, tag 0x0112).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # a phone held upright: stored lying on its side, turned 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # turned 90° anticlockwise
}


def asymmetric(h: int = 24, w: int = 40) -> np.ndarray:
    """Flat blocks (little JPEG ringing), no symmetry: every transpose of it is a different image."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :] = (40, 40, 40)
    a[: h // 3, : w // 4] = (250, 30, 30)  # top left: red
    a[-h // 3 :, -w // 2 :] = (30, 30, 250)  # bottom right: blue
    a[: h // 2, -w // 5 :] = (30, 250, 30)  # top right: green
    return a


def save(image: np.ndarray, fmt: str, orientation: int | None = None, exif: bytes | None = None, **kw) -> io.BytesIO:
    if orientation is not None:
        e = Image.Exif()
        e[0x0112] = orientation
        exif = e.tobytes()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"exif": exif} if exif is not None else {}), **kw)
    buf.seek(0)
    return buf


FORMATS = {"JPEG": {"quality": 95}, "PNG": {}, "WEBP": {"lossless": True}, "TIFF": {}}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_returns_every_orientation_upright_and_image_size_its_upright_size(fmt, orientation):
    stored = asymmetric()
    plain = read_image(save(stored, fmt, **FORMATS[fmt]))  # the same pixels, no orientation (JPEG: same rounding)
    oriented = save(stored, fmt, orientation, **FORMATS[fmt])
    got = read_image(oriented)
    np.testing.assert_array_equal(got, UPRIGHT[orientation](plain))
    np.testing.assert_array_equal(got, np.asarray(ImageOps.exif_transpose(Image.open(oriented)).convert("RGB")))
    assert image_size(oriented) == got.shape[:2] == ((40, 24) if orientation >= 5 else (24, 40))


def test_orientation_6_is_a_portrait_phone_photo_and_paths_work_too(tmp_path):
    stored = asymmetric(30, 40)  # landscape as stored
    path = tmp_path / "phone.jpg"
    path.write_bytes(save(stored, "JPEG", 6, quality=95).getvalue())
    got = read_image(path)
    assert image_size(path) == got.shape[:2] == (40, 30)  # portrait
    assert got[2, -3, 0] > 200 and got[2, -3, 1] < 80  # the stored top-left red corner is now the top right


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage, not a TIFF header", b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
                                  "orientation 9", "orientation 0"])  # fmt: skip
def test_a_broken_exif_block_keeps_the_stored_orientation(fmt, exif):
    stored = asymmetric()
    if isinstance(exif, str):
        e = Image.Exif()
        e[0x0112] = int(exif.split()[1])
        exif = e.tobytes()
    plain = read_image(save(stored, fmt, **FORMATS[fmt]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's "Corrupt EXIF data"
        broken = save(stored, fmt, exif=exif, **FORMATS[fmt])
        np.testing.assert_array_equal(read_image(broken), plain)
        assert image_size(broken) == plain.shape[:2]


def jpeg(image: np.ndarray, quality: int = 90) -> io.BytesIO:
    return save(image, "JPEG", quality=quality)


def cover(h: int, w: int, t: int) -> tuple[int, int]:
    """(width, height) that the center-crop resize to t x t covers, as `vaekit encode` passes reduce_to."""
    s = t / min(h, w)
    return math.ceil(w * s), math.ceil(h * s)


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])  # MPO: what some cameras write, a JPEG and more pictures
def test_reduce_to_with_orientation_6_keeps_the_margin_on_the_upright_sides(fmt):
    # Stored 2048 wide x 768 high, upright 768 wide x 2048 high, asked for M x (w, h) = (256, 128) upright
    # (M = REDUCE_MARGIN): 1/2 scale keeps (384, 1024). Taken in the file's orientation, the request would
    # allow 1/4 scale and leave 192 < 256 columns upright.
    w, h = 256 // REDUCE_MARGIN, 128 // REDUCE_MARGIN
    yy, xx = np.mgrid[0:768, 0:2048]
    stored = np.stack([xx % 256, yy % 256, (xx // 8 + yy // 8) % 256], -1).astype(np.uint8)
    more = {"save_all": True, "append_images": [Image.new("RGB", (64, 64))]} if fmt == "MPO" else {}
    f = save(stored, fmt, 6, quality=95, **more)
    assert Image.open(f).format == fmt
    full = read_image(f)
    got = read_image(f, reduce_to=(w, h))
    assert full.shape == (2048, 768, 3) and got.shape == (1024, 384, 3)
    assert got.shape[0] >= REDUCE_MARGIN * h and got.shape[1] >= REDUCE_MARGIN * w
    halved = np.asarray(Image.fromarray(full).reduce(full.shape[0] // got.shape[0]))
    assert np.abs(got.astype(int) - halved).mean() < 3  # the same picture, upright


def big(image: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))


@pytest.mark.parametrize("name", ["flower", "chelsea", "corners", "hues", "petal"])
def test_a_reduced_decode_stays_within_the_documented_bound_of_a_full_decode(name):
    # 1536 x 1024: for targets 64 and 128 the decode keeps exactly REDUCE_MARGIN (4) x, the worst case.
    if name in ("flower", "chelsea"):  # mirrored copies: the photo's own detail
        image = dict(sample_images("val"))[name]
        image = np.pad(image, ((0, 1024 - image.shape[0]), (0, 1536 - image.shape[1]), (0, 0)), mode="symmetric")
    else:  # smooth saturated gradients, and flat saturated patches with sharp edges
        image = big(dict(synthetic_colours())[name], 1024, 1536)
    f = jpeg(image, 90)
    full = read_image(f)
    for t in (64, 128):
        got = read_image(f, reduce_to=cover(*full.shape[:2], t))
        assert got.shape[0] == REDUCE_MARGIN * t  # decoded at 1/4 and 1/2 scale
        d = np.abs(fit(got, (t, t), "center-crop")[0].astype(int) - fit(full, (t, t), "center-crop")[0])
        assert d.max() <= REDUCE_BOUND and d.mean() < 0.6, (t, d.max(), d.mean())


def test_a_jpeg_whose_sides_the_scale_does_not_divide_is_decoded_whole():
    # A partial last block would decode as a whole pixel: the picture a few file pixels too large.
    f = jpeg(big(dict(synthetic_colours())["hues"], 1001, 1500))
    assert read_image(f, reduce_to=(96, 64)).shape == (1001, 1500, 3)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit grey) but holds a few bytes of nonsense: opening it reads
    the size, decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"nonsense") + chunk(b"IEND", b"")


@pytest.mark.parametrize("w, h", [(10000, 10000), (20000, 20000)])  # above PIL's warning, above PIL's error
def test_too_many_pixels_raise_one_message_before_decoding(tmp_path, w, h):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(w, h))
    want = f"{w}x{h} is {w * h:,} pixels, above the decompression-bomb limit of 89,478,485"
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (nor any other)
        for read in (read_image, image_size, lambda f: read_image(f, reduce_to=(64, 64))):
            for f in (path, io.BytesIO(path.read_bytes())):
                with pytest.raises(ImageTooLarge) as e:
                    read(f)
                assert str(e.value) == want and isinstance(e.value, ValueError)
        assert image_size(path, max_pixels=None) == (h, w)  # the header alone: no decoding
    assert Image.MAX_IMAGE_PIXELS == limit and MAX_PIXELS == 89_478_485


def test_the_limit_applies_to_the_upright_size_and_any_max_pixels():
    f = save(asymmetric(24, 40), "PNG", 6)
    with pytest.raises(ImageTooLarge, match=r"^24x40 is 960 pixels, above the decompression-bomb limit of 959$"):
        read_image(f, max_pixels=959)
    assert read_image(f, max_pixels=960).shape == (40, 24, 3)
    with pytest.raises(ImageTooLarge):
        image_size(f, max_pixels=959)


def test_the_same_nonsense_within_the_limit_fails_only_when_decoded():
    f = io.BytesIO(png_header(100, 100))
    assert image_size(f) == (100, 100)
    with pytest.raises(Exception) as e:  # nonsense pixel data: a decode error, not a size error
        read_image(f)
    assert not isinstance(e.value, ImageTooLarge)

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit.data import (
    SAMPLE_TRAIN,
    SAMPLE_VAL,
    CropDataset,
    Crops,
    ShardStream,
    StreamSampler,
    center_crop,
    held_out,
    iter_images,
    load_images,
    random_crop,
    sample_images,
    training_data,
)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Every format and mode the dataset must turn into RGB, in nested folders, plus one broken file."""
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(_photo(40, 50, 1)).save(root / "rgb.png")
    Image.fromarray(_photo(40, 50, 2)).save(root / "a" / "photo.jpg", quality=95)
    Image.fromarray(_photo(40, 50, 3)).save(root / "a" / "b" / "photo.webp")
    Image.fromarray(_photo(40, 50, 4)).save(root / "a" / "b" / "photo.bmp")
    Image.fromarray(_photo(40, 50, 5)[..., 0]).save(root / "gray.png")
    Image.fromarray(np.dstack([_photo(40, 50, 6), np.full((40, 50), 255, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(_photo(40, 50, 7)).convert("P").save(root / "palette.png")
    Image.fromarray((_photo(40, 50, 8)[..., 0].astype(np.uint16) * 257)).save(root / "deep16.png")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored")
    return root


def test_sample_images_are_fixed_real_photos_with_a_disjoint_held_out_part():
    train, val = sample_images("train"), sample_images("val")
    assert [n for n, _ in train] == list(SAMPLE_TRAIN) and [n for n, _ in val] == list(SAMPLE_VAL)
    assert set(SAMPLE_TRAIN).isdisjoint(SAMPLE_VAL) and len(val) == 3
    for name, image in train + val:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256, name  # big enough for the 256x256 evaluation
        assert image.std() > 10, name  # a photo, not a blank
    assert [n for n, _ in sample_images()] == list(SAMPLE_TRAIN + SAMPLE_VAL)
    assert [n for n, _ in load_images("samples:val")] == list(SAMPLE_VAL)
    with pytest.raises(ValueError, match="samples:val"):
        sample_images("test")


def test_samples_native_is_held_out_native_crops_and_saturated_colours():
    from vaekit.data import NATIVE_CROPS, _sample_photo, held_out_sets, sources

    sets = held_out_sets()
    crops, synthetic = sets["crops"], sets["synthetic"]
    assert [n for n, _ in sample_images("native")] == [n for n, _ in crops + synthetic] and (len(crops), len(synthetic)) == (10, 7)
    assert all(im.shape == (256, 256, 3) and im.dtype == np.uint8 for _, im in crops + synthetic)
    train = dict(sample_images("train"))
    for name, (strip, boxes) in NATIVE_CROPS.items():
        full = _sample_photo(name)
        if name in SAMPLE_TRAIN:  # training sees the photo without the strip its crops come from
            assert strip == 256 and train[name].shape[1] == full.shape[1] - strip
            assert all(x >= full.shape[1] - strip for x, _ in boxes)
            assert np.array_equal(train[name], full[:, : full.shape[1] - strip])
        else:
            assert name in SAMPLE_VAL and strip == 0
    # Native resolution: a crop is the photo's own pixels, not a resized view.
    name, image = crops[0]
    photo, (x, y) = _sample_photo(name.split("@")[0]), map(int, name.split("@")[1].split(","))
    assert np.array_equal(image, photo[y : y + 256, x : x + 256])
    colours = dict(synthetic)
    corners = {tuple(c) for c in colours["corners"].reshape(-1, 3)}
    assert corners == {(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)}
    assert colours["petal"][..., 2].mean() < 5 and colours["petal"][..., 0].mean() > 200  # an orange petal: no blue
    assert sources("samples:native").isdisjoint(sources("samples"))


def test_iter_images_converts_every_mode_to_rgb_and_lists_unreadable_files(folder: Path):
    skipped: list[str] = []
    images = dict(iter_images(str(folder), skipped))
    assert sorted(images) == sorted(
        ["rgb.png", "a/photo.jpg", "a/b/photo.webp", "a/b/photo.bmp", "gray.png", "rgba.png", "palette.png", "deep16.png"]
    )
    for image in images.values():
        assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    assert np.array_equal(images["rgb.png"], _photo(40, 50, 1))
    assert np.array_equal(images["gray.png"][..., 1], _photo(40, 50, 5)[..., 0])
    assert np.array_equal(images["deep16.png"][..., 0], _photo(40, 50, 8)[..., 0])  # 16-bit scaled back to 8
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image"):
        assert len(load_images(str(folder))) == 8
    assert [n for n, _ in load_images(str(folder / "rgb.png"))] == ["rgb.png"]


def test_random_crop_scales_within_bounds_and_flips():
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3)).copy()
    rng = np.random.default_rng(0)
    spans = [int(c[0, -1, 0]) - int(c[0, 0, 0]) for c in (random_crop(ramp, 32, rng, flip=False) for _ in range(50))]
    assert set(spans) == {31}  # no down-scale: 32 neighbouring columns
    spans = [int(c[0, -1, 0]) - int(c[0, 0, 0]) for c in (random_crop(ramp, 32, rng, 0.25, flip=False) for _ in range(200))]
    assert min(spans) >= 25 and max(spans) > 90 and max(spans) <= 4 * 31 + 2  # scaled by [1/4, 1]
    flipped = [random_crop(ramp, 32, rng)[0, :, 0] for _ in range(50)]
    assert any(r[0] > r[-1] for r in flipped) and any(r[0] < r[-1] for r in flipped)
    # Never so small that the crop does not fit; a too-small image is scaled up to fit.
    assert random_crop(_photo(40, 300), 32, rng, 0.01).shape == (32, 32, 3)
    assert random_crop(_photo(20, 30), 32, rng).shape == (32, 32, 3)


def test_random_crop_permutes_colors_only_when_asked():
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # R, G, B told apart by value
    rng = np.random.default_rng(0)
    orders = {tuple(random_crop(image, 32, rng, permute_colors=True)[0, 0]) for _ in range(200)}
    assert orders == {(10, 20, 30), (10, 30, 20), (20, 10, 30), (20, 30, 10), (30, 10, 20), (30, 20, 10)}
    assert {tuple(random_crop(image, 32, rng)[0, 0]) for _ in range(50)} == {(10, 20, 30)}  # off by default


def test_center_crop_resizes_the_shorter_side_then_cuts_the_middle():
    image = _photo(300, 451)
    assert center_crop(image, 256).shape == (256, 256, 3)
    square = _photo(64, 64)
    assert np.array_equal(center_crop(square, 64), square)
    wide = _photo(64, 100)
    assert np.array_equal(center_crop(wide, 64), wide[:, 18:82])


def test_stream_sampler_is_seeded_resumable_and_splits_ranks():
    full = StreamSampler(10, 4, seed=3)
    first = [b for b, _ in zip(full, range(6))]
    assert first == [b for b, _ in zip(StreamSampler(10, 4, seed=3), range(6))]
    assert first != [b for b, _ in zip(StreamSampler(10, 4, seed=4), range(6))]
    assert [b for b, _ in zip(StreamSampler(10, 4, seed=3, start=2), range(4))] == first[2:]
    epoch = [i for b in first for i, _ in b][:10]
    assert sorted(epoch) == list(range(10))  # each epoch is a permutation
    assert epoch != [i for b in first for i, _ in b][10:20]  # and each epoch a new one
    r0 = [i for b, _ in zip(StreamSampler(10, 5, seed=3, rank=0, world=2), range(1)) for i, _ in b]
    r1 = [i for b, _ in zip(StreamSampler(10, 5, seed=3, rank=1, world=2), range(1)) for i, _ in b]
    assert sorted(r0 + r1) == list(range(10))  # the two ranks split an epoch between them


def test_loader_batches_do_not_depend_on_worker_count():
    data = training_data("samples", 32, min_scale=0.5)
    one = [b.images for b, _ in zip(data.loader(4, seed=1, workers=0), range(3))]
    two = [b.images for b, _ in zip(data.loader(4, seed=1, workers=2), range(3))]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert one[0].shape == (4, 3, 32, 32) and one[0].dtype == torch.uint8
    assert not torch.equal(one[0], one[1])
    assert [n for n, _ in data.val] == list(SAMPLE_VAL) and data.val[0][1].shape == (256, 256, 3)


def test_folder_split_is_by_name_and_unreadable_files_are_reported_with_the_batch(folder: Path):
    data = training_data(str(folder), 16, val_fraction=0.3, val_resolution=32)
    val_names = [n for n, _ in data.val]
    assert val_names and all(held_out(n, 0.3) for n in val_names)
    train_files = {str(p.relative_to(folder)) for p in data.dataset.items}
    assert train_files.isdisjoint(val_names) and len(train_files) + len(val_names) == 9
    assert data.val[0][1].shape == (32, 32, 3)
    batches = [b for b, _ in zip(data.loader(len(train_files), seed=0), range(3))]
    skipped = {s for b in batches for s in b.skipped}
    assert "broken.jpg" in train_files  # (its name hashes into training)
    assert len(skipped) == 1 and "broken.jpg" in skipped.pop()
    assert all(b.images.shape == (len(train_files), 3, 16, 16) for b in batches)
    # --val DIR replaces the held-out split; every image then trains.
    with_val = training_data(str(folder), 16, val="samples:val", val_resolution=32)
    assert len(with_val.dataset) == 9 and [n for n, _ in with_val.val] == list(SAMPLE_VAL)


def test_crop_dataset_replaces_an_unreadable_file_by_the_next_one(tmp_path: Path):
    good = tmp_path / "good.png"
    Image.fromarray(_photo(20, 20)).save(good)
    (tmp_path / "bad.png").write_bytes(b"junk")
    crop, bad = CropDataset([tmp_path / "bad.png", good], Crops(16))[(0, (0, 0, 0))]
    assert crop.shape == (3, 16, 16) and len(bad) == 1 and "bad.png" in bad[0]


def _write_shards(root: Path, shards: int = 2, per_shard: int = 6) -> str:
    import webdataset as wds

    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(np.full((24, 24, 3), 10 * (s * per_shard + i), np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"s{s}_{i:02d}", "png": buf.getvalue(), "txt": "caption"})
    return str(root / ("{000..%03d}.tar" % (shards - 1)))


def _values(batches) -> list[int]:
    return [int(v) for b in batches for v in b.images[:, 0, 0, 0]]  # each image is one flat colour


def test_shards_stream_every_sample_per_epoch_resume_exactly_and_split_ranks(tmp_path: Path):
    pattern = _write_shards(tmp_path)
    data = training_data(pattern, 16, val_fraction=0.0)
    assert isinstance(data.dataset, ShardStream) and data.val == []
    batches = [b for b, _ in zip(data.loader(3, seed=5), range(8))]
    values = _values(batches)
    assert sorted(values[:12]) == [10 * i for i in range(12)]  # one epoch: every sample once
    assert values[:12] != values[12:24]  # reshuffled every epoch
    assert _values(b for b, _ in zip(data.loader(3, seed=5, start=5), range(3))) == values[15:24]
    # With 2 workers the loader interleaves two streams; resuming at an odd batch still continues exactly.
    two = _values(b for b, _ in zip(data.loader(3, seed=5, workers=2), range(6)))
    assert _values(b for b, _ in zip(data.loader(3, seed=5, workers=2, start=3), range(3))) == two[9:18]
    r0 = _values(b for b, _ in zip(data.loader(3, seed=5, rank=0, world=2), range(2)))
    r1 = _values(b for b, _ in zip(data.loader(3, seed=5, rank=1, world=2), range(2)))
    assert sorted(r0 + r1) == [10 * i for i in range(12)]  # ranks read different shards
    # A validation fraction holds samples out of training by key.
    held = training_data(pattern, 16, val_fraction=0.5, val_resolution=16)
    val_keys = {k for k, _ in held.val}
    assert val_keys and all(held_out(k, 0.5) for k in val_keys)
    trained = set(_values(b for b, _ in zip(held.loader(1, seed=0), range(12))))
    assert trained.isdisjoint({int(im[0, 0, 0]) for _, im in held.val})
    assert [n for n, _ in load_images(pattern)][:3] == ["s0_00", "s0_01", "s0_02"]


def test_training_never_validates_on_its_own_images_without_a_warning(tmp_path: Path):
    # samples:all holds the three photos the built-in data validates on: refused, with what to do instead.
    with pytest.raises(ValueError, match="samples:all includes chelsea, coffee and flower.*--val"):
        training_data("samples:all", 32)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disjoint --val and --data: no warning
        training_data("samples", 32, val=str(folder), val_resolution=32)
        training_data(str(folder), 32, val="samples:val", val_resolution=32)
        training_data("samples:all", 32, val=str(folder), val_resolution=32)
    cases = [("samples", "samples:train", "13 image(s)"), ("samples:all", "samples:val", "3 image(s) with --data (samples:chelsea"),
             (str(folder), str(folder / "2.png"), "1 image(s)"), (str(folder), str(folder), "4 image(s)")]  # fmt: skip
    for data, val, shared in cases:
        with pytest.warns(RuntimeWarning, match=re.escape(f"--val shares {shared}")):
            training_data(data, 32, val=val, val_resolution=32)

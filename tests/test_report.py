"""The HTML reports and the `analyze` / `compare` commands, on tiny random models and real photos."""

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from test_metrics import offline

from vaekit import analysis, preset
from vaekit.cli import main
from vaekit.data import center_crop, to_tensor, write_image
from vaekit.metrics import psnr
from vaekit.model import Autoencoder
from vaekit.report import MEASURES, best_index, fmt, lookup, slug, write_analysis_report

FAST = ["--resolution", "32", "--lpips", "off", "--samples", "4", "--steps", "4", "--pairs", "1"]


class Links(HTMLParser):
    """Every src/href in a page, and whether it has scripts."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if "href" in a:
            self.links.append(a["href"])
        self.scripts += tag == "script"


def parse(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text(encoding="utf-8"))
    return links


def assert_self_contained(page: Path) -> Links:
    """Every picture and link is a relative file that exists; nothing would be fetched from outside."""
    links = parse(page)
    assert links.images and links.scripts == 0
    for ref in links.images + links.links:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (page.parent / ref).is_file(), ref
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "@import" not in text
    return links


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name, image in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        write_image(folder / f"{name}.png", center_crop(image, 48))
    return folder


def test_formatting_and_best_values():
    assert fmt(None) == "–" and fmt(float("inf")) == "∞" and fmt(0.12345, 2) == "0.12" and fmt(2e-5, 3) == "2.00e-05"
    assert best_index([20.0, 25.0, 22.0], "high") == 1
    assert best_index([0.3, 0.1, None], "low") == 1
    assert best_index([1.5, 0.9, 1.0], "one") == 2
    assert best_index([0.5, 0.5], "low") is None  # a tie has no winner
    assert best_index([1.0, 2.0], "") is None
    assert lookup({"a": {"b": 3}}, "a.b") == 3 and lookup({"a": {}}, "a.b") is None
    assert slug("runs/ae/model") == "runs_ae_model" and slug("preset:tiny-f8c4") == "preset_tiny-f8c4"
    assert all(m.better in ("high", "low", "one", "") and m.meaning.endswith(".") for m in MEASURES.values())


def test_analysis_report_is_self_contained_and_holds_every_number(tmp_path, tiny_model):
    from skimage import data

    x = torch.cat([to_tensor(center_crop(p, 32)) for p in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())])
    result = analysis.analyze(tiny_model, x, pairs=2, steps=4, samples=4, progress=False)
    result.numbers.update(model="tiny <model>", data="photos", sources=["a", "b", "c", "d"])
    page = write_analysis_report(result, tmp_path / "report", "vaekit analyze: tiny <model>", notes=["LPIPS not measured (offline)"])
    links = assert_self_contained(page)
    assert "report.json" in links.links
    for name in ("interpolation_0", "interpolation_1", "perturbation_0", "samples_prior", "samples_fitted", "worst_0",
                 "blur_spectra", "continuity_curves", "latent_histograms", "latent_kl", "latent_spectrum"):
        assert f"{name}.png" in links.images
    text = page.read_text(encoding="utf-8")
    assert "tiny &lt;model&gt;" in text and "tiny <model>" not in text  # escaped
    assert "LPIPS not measured (offline)" in text
    for path in ("reconstruction.psnr", "blur.high_frequency_ratio", "continuity.interpolation.l2.worst_jump", "latents.kl_min"):
        assert MEASURES[path].meaning in text  # each number is explained
        assert fmt(lookup(result.numbers, path), MEASURES[path].digits) in text
    saved = json.loads((page.parent / "report.json").read_text())
    assert saved["reconstruction"]["psnr"] == pytest.approx(float(psnr(x, result.reconstructions).mean()))
    assert saved["latents"]["channels"][2]["kl"] == pytest.approx(result.numbers["latents"]["channels"][2]["kl"])
    from PIL import Image

    strip = np.asarray(Image.open(page.parent / "interpolation_0.png"))
    assert np.array_equal(strip, result.images["interpolation_0"])  # the pictures are the measured ones


def test_json_has_no_infinities(tmp_path, tiny_model):
    """Identical images give PSNR inf; JSON has no inf, so it is written as null."""
    result = analysis.analyze(tiny_model, torch.zeros(2, 3, 16, 16), pairs=1, steps=3, samples=2, progress=False)
    result.numbers["reconstruction"]["psnr"] = math.inf
    page = write_analysis_report(result, tmp_path, "t")
    assert json.loads((page.parent / "report.json").read_text())["reconstruction"]["psnr"] is None


def test_analyze_command_writes_the_report(tmp_path, photo_folder, capsys):
    assert main(["analyze", "preset:tiny-f8c4", str(photo_folder), "--report", str(tmp_path / "r"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "PSNR (dB)" in out and "wrote" in out
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["model"] == "preset:tiny-f8c4" and saved["n_images"] == 3 and saved["resolution"] == [32, 32]
    assert saved["sources"] == ["astronaut.png", "chelsea.png", "coffee.png"] and saved["lpips"] is None
    assert len(saved["continuity"]["interpolation"]["l2"]["steps"][0]) == 3  # 4 points, 3 steps
    assert_self_contained(tmp_path / "r" / "report.html")


def test_analyze_without_lpips_weights_says_how_to_go_on_in_its_own_flags(tmp_path, photo_folder, monkeypatch, capsys):
    offline(monkeypatch, tmp_path)
    args = [a for a in FAST if a not in ("--lpips", "off")]
    assert main(["analyze", "preset:tiny-f8c4", str(photo_folder), "--report", str(tmp_path / "r"), *args, "--lpips", "alex"]) == 0
    err = capsys.readouterr().err
    assert "LPIPS not measured (LPIPS (alex) needs the weights file alexnet-owt-7be5be79.pth" in err
    assert "or pass --lpips off to leave it out without this note)" in err


def test_compare_ae_and_vaes_with_different_latents(tmp_path, photo_folder, capsys):
    ae = tmp_path / "ae"
    torch.manual_seed(1)
    Autoencoder(preset("tiny-f8c4").replace(kind="ae", family="")).save(str(ae))
    models = ["preset:tiny-f8c4", "preset:tiny-f8c16", str(ae)]
    assert main(["compare", *models, str(photo_folder), "--report", str(tmp_path / "c"), "--crops", "2", *FAST]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in models)
    page = tmp_path / "c" / "report.html"
    links = assert_self_contained(page)
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert list(saved["models"]) == models
    kinds = {m: (saved["models"][m]["kind"], saved["models"][m]["latent_channels"]) for m in models}
    assert kinds == {models[0]: ("vae", 4), models[1]: ("vae", 16), models[2]: ("ae", 4)}
    assert saved["models"][models[2]]["latents"]["kl_min"] is None  # a plain AE has no KL
    # Crops of the same two regions: the original plus one per model, all the same size.
    crops = [s for s in links.images if s.startswith("crop_")]
    assert len(crops) == 2 * (1 + len(models))
    from PIL import Image

    assert len({Image.open(page.parent / c).size for c in crops}) == 1
    # Each model's own full report, linked from the table.
    for m in models:
        sub = page.parent / saved["reports"][m]
        assert sub.name == "report.html" and saved["reports"][m] in links.links
        assert_self_contained(sub)
    text = page.read_text(encoding="utf-8")
    assert text.count('class="best"') >= 4  # the best value of each column is marked


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "preset:tiny-f8c4", "{data}"], "at least 2 models"),
        (["analyze", "preset:tiny-f8c4", "{data}", "--resolution", "36", "--lpips", "off"], "use --resolution 32 or 40"),
        (["analyze", "preset:tiny-f8c4", "{data}/astronaut.png", "--lpips", "off"], "at least 2"),
        (["analyze", "preset:nope", "{data}", "--lpips", "off"], "unknown preset"),
    ],
)
def test_analysis_errors_are_one_line(argv, message, photo_folder, tmp_path, capsys):
    argv = [a.replace("{data}", str(photo_folder)) for a in argv] + ["--report", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err

"""`vaekit bench` (issue 14): the harness measures what it says, on a tiny model against diffusers."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb

import vaekit
from vaekit.cli import main
from vaekit.model import lean

PROBE = """
import json, time, torch
from vaekit.speed import peak_memory
cpu = torch.device("cpu")
held = torch.ones(64 * 2**20 // 4)  # 64 MB before the block: not counted
with peak_memory(cpu) as mem:
    t = torch.ones(128 * 2**20 // 4)  # 128 MB inside it, alive for 50 ms, then freed
    time.sleep(0.05)
    del t
with peak_memory(cpu) as small:
    torch.ones(16)
print(json.dumps([mem["mb"], small["mb"]]))
"""


def test_peak_memory_sees_an_allocation_and_forgets_what_came_before():
    # In a fresh process: RSS only shows memory newly taken from the system, and a worker that ran other
    # tests may hold freed memory its allocator reuses (the benchmark's 1024² figures also come from fresh processes).
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    big, small = json.loads(done.stdout.splitlines()[-1])
    assert 110 < big < 200 and small < 20, (big, small)


def test_bench_times_both_implementations_and_counts_flops(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "preset:tiny-f8c4", "--size", "32", "64", "--repeats", "2", "--json", str(out), "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| encode | 32² | 1 | fp32 direct |" in text and "GFLOP/s" in text  # the suite's path (conftest)
    data = json.loads(out.read_text())
    rows = {(r["op"], r["size"]): r for r in data["rows"]}
    assert set(rows) == {("encode", 32), ("decode", 32), ("encode", 64), ("decode", 64)}
    for r in rows.values():
        assert r["seconds"] > 0 and r["peer_seconds"] > 0 and r["max_abs_diff"] < 1e-4  # the same weights, the same outputs
        assert r["speedup"] == r["peer_seconds"] / r["seconds"] and r["rss_mb"] is not None
    # FLOPs scale with the pixels: 4x the pixels, 4x the work (within the attention's quadratic part).
    for op in ("encode", "decode"):
        ratio = rows[(op, 64)]["gflop_per_image"] / rows[(op, 32)]["gflop_per_image"]
        assert 3.9 < ratio < 4.5, (op, ratio)
    assert data["peaks"]["matmul_gflops"] > 1 and data["peaks"]["conv_gflops"] > 1


def test_every_family_is_timed_against_its_own_diffusers_class():
    from vaekit import preset
    from vaekit.model import Autoencoder
    from vaekit.speed import bench, diffusers_peer

    small = {"AutoencoderKLFlux2": preset("flux2").replace(block_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),
             "AutoencoderKLQwenImage": preset("qwenimage").replace(block_channels=(8, 16, 16, 16), layers_per_block=1),
             "AutoencoderKLHunyuanImage": preset("hunyuanimage").replace(block_channels=(32, 64, 64, 64), latent_channels=16,
                                                                         layers_per_block=1)}  # fmt: skip
    for name, config in small.items():
        torch.manual_seed(0)
        model = Autoencoder(config).eval()
        assert type(diffusers_peer(model, torch.float32)).__name__ == name
        rows, _ = bench(model, [32], [1], ["fp32"], repeats=1)
        for r in rows:
            assert r.peer_seconds > 0 and r.max_abs_diff < 1e-4, (name, r.op, r.max_abs_diff)
    assert diffusers_peer(Autoencoder(preset("pixel")), torch.float32) is None  # pixel space has no diffusers class


def test_inference_levers_change_no_value(monkeypatch, tiny_model):
    """In-place SiLU/residual, banded norm+SiLU+conv and banded upsample+conv (no autograd only) give what the
    training-mode forward gives."""
    from vaekit.model import lean, ldm

    monkeypatch.setattr(lean, "BAND_BYTES", 4096)  # many bands even at this size
    monkeypatch.setattr(lean, "BANDED_FROM", 0)
    banded = []
    plain = lean.norm_silu_conv_banded
    monkeypatch.setattr(lean, "norm_silu_conv_banded", lambda x, *a, **k: banded.append(x.shape) or plain(x, *a, **k))
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    want_z = tiny_model.encode(x).mean.detach()
    want = tiny_model.decode(want_z).detach()  # autograd on: the plain forward
    with torch.inference_mode():
        z = tiny_model.encode(x).mean
        got = tiny_model.decode(z)
        tiled = tiny_model.decode(z, tile=16)
    torch.testing.assert_close(z, want_z, atol=5e-6, rtol=0)  # float summation order: GroupNorm statistics in two passes
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled, want, atol=1e-5, rtol=0)
    # The banded norm+SiLU+conv ran, in every full-resolution ResnetBlock and the output layers, but not under tiling
    # (there the norms take the whole image's statistics from vaekit.model.tiling, and tiles are small anyway).
    untiled = len(banded)
    assert (2, 16, 48, 40) in banded and untiled >= 2 * 3 + 1, banded
    with torch.inference_mode():
        tiny_model.decode(z, tile=16)
    assert len(banded) == untiled
    # Large activations far from zero, where a GroupNorm's statistics lose precision first.
    block = perturb(ldm.ResnetBlock(32, 16, 8), seed=1)
    h = torch.randn(1, 32, 64, 48) * 20 + 50
    with torch.no_grad():
        torch.testing.assert_close(block(h), block.nin_shortcut(h) + block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(h)))))),
                                   atol=2e-5, rtol=1e-6)  # fmt: skip
    # The banded path really ran: the upsampled tensor it avoids would not fit the band.
    up = tiny_model.decoder.up[1].upsample
    h = torch.randn(1, up.conv.in_channels, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(lean.upsample_conv_banded(h, up.conv), up.conv(torch.nn.functional.interpolate(h, scale_factor=2.0)),
                                   atol=1e-6, rtol=0)  # fmt: skip


def test_group_moments_are_as_exact_as_float64_and_whole_tensors_below_banded_from_run_whole(monkeypatch, tiny_model):
    """The banded paths' statistics (two cache-sized passes, faster than var_mean) against float64, on activations far
    from zero and over several chunks; below BANDED_FROM nothing runs banded (one whole-tensor pass per op)."""
    from vaekit.model import lean

    monkeypatch.setattr(lean, "STATISTICS_CHUNK", 4096)  # many chunks
    rows = torch.randn(8, 50_001, generator=torch.Generator().manual_seed(0)) * 20 + 50
    var, mean = lean.group_moments(rows)
    want_var, want_mean = torch.var_mean(rows.double(), dim=1, correction=0)
    assert ((var.double() - want_var).abs() / want_var).max() < 1e-6 and (mean.double() - want_mean).abs().max() < 1e-5
    calls = []
    monkeypatch.setattr(lean, "norm_silu_conv_banded", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(lean, "BAND_BYTES", 4096)
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.inference_mode():
        tiny_model.decode(tiny_model.encode(x).mean)  # every tensor above 2 bands, all below BANDED_FROM
    assert not calls


def test_the_mid_block_writes_over_its_own_tensors_and_the_callers_only_when_told(monkeypatch):
    """Inference writes every step of the mid block over the running tensor (the decoder's head over conv_in's
    output too, by `overwrite`): the values of the autograd forward, the caller's input kept unless it says."""
    from vaekit.model import lean, ldm

    monkeypatch.setattr(lean, "BAND_BYTES", 4096)  # the banded paths at this size
    monkeypatch.setattr(lean, "BANDED_FROM", 0)
    monkeypatch.setattr(lean, "ATTENTION_QUERIES", 7)
    mid = perturb(ldm.MidBlock(32, 8, attention=True), seed=3)
    x = torch.randn(2, 32, 12, 10) * 3 + 1
    want = mid(x).detach()
    with torch.inference_mode():
        kept = x.clone()
        got = mid(kept)
        mine = x.clone()
        over = mid(mine, overwrite=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert torch.equal(kept, x)
    torch.testing.assert_close(over, want, atol=2e-5, rtol=0)
    assert over.data_ptr() == mine.data_ptr()
    block = perturb(ldm.ResnetBlock(32, 16, 8), seed=4)  # changes channels: cannot write over its input
    want = block(x).detach()
    with torch.inference_mode():
        mine = x.clone()
        got = block(mine, overwrite=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert torch.equal(mine, x)


def test_bench_compiles_both_and_reports_the_compile_time(capsys):
    # The "eager" backend: dynamo's tracing and guards without inductor's C++ codegen, which takes minutes on 2
    # cores; `vaekit bench --compile` defaults to inductor (docs/BENCHMARKS.md has its numbers).
    argv = ["bench", "preset:tiny-f8c4", "--size", "32", "--repeats", "1", "--threads", "1", "--compile", "eager"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    header, _, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert header.endswith("| compile s (vaekit / diffusers) |") and len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours, theirs = (float(v) for v in cells[-1].split(" / "))
        assert ours > 0 and theirs > 0  # the first call traced the graph; the timed ones did not
        assert float(cells[-2]) < 1e-4  # compiled or not, the same outputs as diffusers
    assert "compiled in" in err


def test_winograd_is_opt_in_within_1e4_and_leaves_training_alone(monkeypatch, tiny_model):
    """`vaekit.winograd()`: NNPACK's convolutions in CPU inference, banded, tiled and in every family, within 1e-4 of the
    direct ones; outside it, or with autograd on, exactly the direct convolution."""
    import vaekit
    from vaekit import preset
    from vaekit.model import Autoencoder, lean

    monkeypatch.setattr(lean, "BAND_BYTES", 4096)  # the banded paths too
    monkeypatch.setattr(lean, "BANDED_FROM", 0)
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z = tiny_model.encode(x).mean
        want = tiny_model.decode(z)
        with vaekit.winograd():
            z_fast, got, tiled = tiny_model.encode(x).mean, tiny_model.decode(z), tiny_model.decode(z, tile=16)
        again = tiny_model.decode(z)
    assert torch.equal(again, want)  # off again after the context
    for fast, exact in ((z_fast, z), (got, want), (tiled, want)):
        assert 0 < (fast - exact).abs().max() < 1e-4  # it ran (other rounding), within the bound
    with vaekit.winograd():  # training: autograd on, the direct convolution
        trained = tiny_model.decode(z.clone().requires_grad_())
    assert torch.equal(trained.detach(), tiny_model.decode(z.clone().requires_grad_()).detach())
    # Qwen-Image's image convolutions are a slice of a video kernel (not contiguous); Hunyuan's resamplers.
    for cfg in (preset("qwenimage").replace(block_channels=(8, 16, 16, 16), layers_per_block=1),
                preset("hunyuanimage").replace(block_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1)):
        torch.manual_seed(0)
        model = perturb(Autoencoder(cfg)).eval()
        y = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.inference_mode():
            exact = model.decode(model.encode(y).mean)
            with vaekit.winograd():
                fast = model.decode(model.encode(y).mean)
        assert 0 < (fast - exact).abs().max() < 1e-4, cfg.arch


def test_bench_winograd_row(capsys):
    argv = ["bench", "preset:tiny-f8c4", "--size", "32", "--repeats", "1", "--threads", "1", "--winograd"]
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| encode") or line.startswith("| decode")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == "fp32 winograd" and 0 < float(cells[-1]) < 1e-4  # against diffusers' direct convolutions


@pytest.fixture
def auto_conv(monkeypatch, tmp_path):
    """The default path, "auto", with a cache of its own and nothing remembered yet in this process."""
    from vaekit.model import convchoice

    monkeypatch.delenv("VAEKIT_CONV", raising=False)
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convchoice, "_TABLE", None)
    monkeypatch.setattr(convchoice, "_USED", {})
    return convchoice


def test_auto_times_each_shape_once_remembers_it_and_obeys_it(auto_conv, monkeypatch, tiny_model):
    """"auto" (the default): both algorithms timed on each new layer shape, the choice kept in the cache file and used
    by later calls and processes without timing again; a choice of Winograd changes the output within 1e-4, of direct
    not at all; conv="direct" is PyTorch's own convolution whatever the cache says."""
    monkeypatch.setattr(lean, "BAND_BYTES", 4096)  # the banded paths too
    monkeypatch.setattr(lean, "BANDED_FROM", 0)
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        exact = tiny_model.decode(tiny_model.encode(x, conv="direct").mean, conv="direct")
        tiny_model.decode(tiny_model.encode(x).mean)  # auto: times every new shape
        tiny_model.decode(tiny_model.encode(x, tile=16).mean, tile=16)  # the tiles' shapes too
    saved = json.loads(auto_conv.cache_file().read_text())["machines"][auto_conv.machine()]
    assert saved == auto_conv.used() and len(saved) >= 4
    for entry in saved.values():
        faster = entry["winograd_ms"] <= auto_conv.WINOGRAD_MARGIN * entry["direct_ms"]
        assert entry["path"] == ("winograd" if faster else "direct") and entry["direct_ms"] > 0
    # A later process reads the file and times nothing: forge the answers and see them obeyed.
    calls = []
    monkeypatch.setattr(auto_conv.time, "perf_counter", lambda: calls.append(1) or 0.0)
    for path in ("winograd", "direct"):
        forged = {key: dict(entry, path=path) for key, entry in saved.items()}
        auto_conv.cache_file().write_text(json.dumps({"version": 1, "machines": {auto_conv.machine(): forged}}))
        monkeypatch.setattr(auto_conv, "_TABLE", None)
        with torch.inference_mode():
            got = tiny_model.decode(tiny_model.encode(x).mean)
            tiled = tiny_model.decode(tiny_model.encode(x, tile=16).mean, tile=16)
            direct = tiny_model.decode(tiny_model.encode(x, conv="direct").mean, conv="direct")
        assert torch.equal(direct, exact)
        assert (tiled - got).abs().max() < 1e-4  # tiled == untiled on either path
        if path == "direct":
            assert torch.equal(got, exact)
        else:
            assert 0 < (got - exact).abs().max() < 1e-4
    assert not calls  # every shape was known: nothing timed


def test_auto_is_within_1e4_of_diffusers_on_the_published_architectures(auto_conv):
    """The fast path's worst case (Winograd wherever "auto" may choose it) against diffusers' classes."""
    from vaekit import preset
    from vaekit.model import Autoencoder
    from vaekit.speed import diffusers_peer

    configs = [preset("sd1").replace(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=16),
               preset("flux1").replace(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=16),
               preset("hunyuanimage").replace(block_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1)]
    for cfg in configs:
        torch.manual_seed(0)
        model = perturb(Autoencoder(cfg)).eval()
        peer = diffusers_peer(model, torch.float32)
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.inference_mode(), vaekit.winograd():
            z, y = model.encode(x).mean, model.decode(model.encode(x).mean)
        with torch.inference_mode():
            z_ref = peer.encode(x).latent_dist.mean
            y_ref = peer.decode(z_ref).sample
        assert (z - z_ref).abs().max() < 1e-4 and (y - y_ref).abs().max() < 1e-4, cfg.arch


def test_conv_flags_and_their_errors(auto_conv, monkeypatch, capsys):
    argv = ["bench", "preset:tiny-f8c4", "--size", "32", "--repeats", "1", "--threads", "1"]
    assert main(argv) == 0  # the default: auto, and the choices it made under the table
    out = capsys.readouterr().out
    assert "| fp32 auto |" in out and "| layer shape | direct ms | Winograd ms | chosen |" in out
    assert f"layer shapes, remembered in {auto_conv.cache_file()}" in out
    assert main(argv + ["--conv", "winograd", "--winograd"]) == 0
    assert "| fp32 winograd |" in capsys.readouterr().out
    for command in (argv, ["decode", "preset:tiny-f8c4", "nothing.safetensors", "out"]):
        assert main(command + ["--conv", "direct", "--winograd"]) == 1
        assert "--winograd and --conv direct contradict each other" in capsys.readouterr().err
    monkeypatch.setenv("VAEKIT_CONV", "fast")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()  # one line before any work, no traceback
    assert err == "vaekit bench: error: VAEKIT_CONV='fast': set it to one of auto, direct, winograd, or unset it"


ATTENTION_PROBE = """
import json, sys, torch
from vaekit.model import lean, ldm
from vaekit.speed import peak_memory
torch.set_num_threads(1)
lean.ATTENTION_QUERIES = 128  # blocks far smaller than an activation, as at 4096² (262,144 tokens in blocks of 4096)
block = ldm.AttnBlock(2048, 32).eval()
x = torch.randn(1, 2048, int(sys.argv[1]), int(sys.argv[1]))
with torch.inference_mode(), peak_memory(torch.device("cpu")) as mem:
    y = block(x, overwrite=True)
print(json.dumps([mem["mb"], x.numel() * 4 / 2**20]))
"""


def test_inference_attention_in_blocks_equals_the_formula_and_holds_only_keys_and_values(monkeypatch):
    """AttnBlock without autograd normalises, projects and attends in blocks of tokens, each block's result
    written out at once: the same values as x + proj(softmax(q kᵀ / √c) v), and (measured in fresh processes)
    besides its input only k and v alive, two activations, where it used to hold four (the 4096² head in
    docs/BENCHMARKS.md). The growth between two sizes is measured, not the peak: it leaves out the fixed
    few MB of buffers and libraries; a fixed glibc mmap threshold makes freed buffers leave RSS."""
    from vaekit.model import lean, ldm

    monkeypatch.setattr(lean, "ATTENTION_QUERIES", 7)  # many blocks, the last one short
    block = perturb(ldm.AttnBlock(16, 8), seed=2)
    x = torch.randn(2, 16, 9, 11)
    n, c, h, w = x.shape
    y = block.norm(x).flatten(2)
    q, k, v = (p.weight.flatten(1) @ y + p.bias[:, None] for p in (block.q, block.k, block.v))
    att = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # (n, queries, keys)
    want = (x + block.proj_out(((v @ att.transpose(1, 2))).view(n, c, h, w))).detach()
    with torch.inference_mode():
        got = block(x)
        mine = x.clone()
        over = block(mine, overwrite=True)
        strided = block(x.transpose(2, 3).contiguous().transpose(2, 3), overwrite=True)  # cannot be written over
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert over.data_ptr() == mine.data_ptr()
    torch.testing.assert_close(over, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(strided, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(block(x).detach(), want, atol=1e-5, rtol=0)  # autograd on: one SDPA call
    assert got.is_contiguous()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = []
    for side in (32, 64):
        done = subprocess.run([sys.executable, "-c", ATTENTION_PROBE, str(side)], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    (mb_small, act_small), (mb_large, act_large) = runs
    activations = (mb_large - mb_small) / (act_large - act_small)
    assert 1.5 < activations < 2.5, runs


def test_bench_says_fewer_than_three_repeats_are_noise(capsys):
    argv = ["bench", "preset:tiny-f8c4", "--size", "32", "--threads", "1", "--against", "none", "--repeats"]
    assert main(argv + ["1"]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "fewer than 3 repeats" in line]
    assert len(notes) == 1 and notes[0].startswith("note: --repeats 1:") and "--repeats 5" in notes[0], err
    assert "fewer than 3" not in out  # a note on stderr, not in the table
    assert main(argv + ["3"]) == 0
    assert "fewer than 3" not in "".join(capsys.readouterr())


def test_bench_keeps_diffusers_notices_out_of_its_table(monkeypatch, capfd):
    """What diffusers says while bench builds its peer (here a logger warning and a print, provoked in
    from_pretrained; without `accelerate` it warns there by itself) stays out of stdout, which holds vaekit's
    table alone; its log level is back where it was afterwards, and vaekit's own notes still show."""
    import logging

    import diffusers
    import pytest
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    seen, heard = [], []
    original = diffusers.AutoencoderKL.from_pretrained

    def noisy(cls, *args, **kwargs):
        seen.append(diffusers_logging.get_verbosity())
        diffusers_logging.get_logger("diffusers.models.modeling_utils").warning("DIFFUSERS-NOTICE logged")
        print("DIFFUSERS-NOTICE printed")
        return original(*args, **kwargs)

    class Listener(logging.Handler):
        def emit(self, record):
            heard.append(record.getMessage())

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", classmethod(noisy))
    listener = Listener()
    diffusers_logging.get_logger().addHandler(listener)  # hears what passes diffusers' level, wherever its handler writes
    before = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_warning()
        argv = ["bench", "preset:tiny-f8c4", "--size", "32", "--repeats", "1", "--threads", "1"]
        assert main(argv) == 0
        out, err = capfd.readouterr()
        assert "DIFFUSERS-NOTICE" not in out and not heard, (out, heard)
        assert all(line.startswith(("machine:", "|")) or not line for line in out.splitlines()), out
        assert len([line for line in out.splitlines() if line.startswith(("| encode", "| decode"))]) == 2
        assert "DIFFUSERS-NOTICE printed" in err  # sent to stderr, not lost
        assert "note: --repeats 1:" in err and "encode 32² x1 fp32 direct:" in err  # vaekit's own lines are not hidden
        assert seen == [logging.ERROR] and diffusers_logging.get_verbosity() == logging.WARNING
        from vaekit.speed import quiet_diffusers

        with pytest.raises(RuntimeError), quiet_diffusers():  # restored on an error too
            raise RuntimeError
        assert diffusers_logging.get_verbosity() == logging.WARNING
    finally:
        diffusers_logging.get_logger().removeHandler(listener)
        diffusers_logging.set_verbosity(before)

"""The performance benchmarks on tiny sizes: throughput vs HF, loss memory under a cap, scaling."""

from __future__ import annotations

import json

import pytest
import torch

from polysense.bench import throughput as tp
from polysense.bench.loss_memory import run_loss_memory_bench, square_bytes
from polysense.models import clip as clip_module
from polysense.models.vit import mlp_dim


def test_matmul_peak_reports_every_size():
    res = tp.matmul_peak(torch.float32, sizes=(64, 128), seconds=0.02)
    assert set(res["by_size"]) == {64, 128}
    kernels = [res["by_size"]]
    if tp.packing_available():  # MKL's packed multiply is timed too, and the better one counts
        assert set(res["packed_by_size"]) == {64, 128}
        kernels.append(res["packed_by_size"])
    assert res["gflops"] == max(r for k in kernels for r in k.values()) > 0
    assert res["size"] in (64, 128)
    assert (res.get("kernel") == "mkl packed") == (res["gflops"] not in res["by_size"].values())


@pytest.fixture(scope="module")
def pair():
    return tp.build_pair("clip-tiny", batch=4, overrides=tp.QUICK_OVERRIDES)


def test_pair_is_one_function_with_equal_parameter_counts(pair):
    """build_pair checks equal counts and image embeddings itself; check the text side too."""
    import torch.nn.functional as F

    hf_params = sum(p.numel() for p in pair.hf.parameters())
    assert pair.params == hf_params == sum(p.numel() for p in pair.ours.parameters())
    assert pair.hf.config._attn_implementation == "sdpa"
    ids = pair.ids
    with torch.inference_mode():
        ours = pair.ours.text(ids)  # (B, W) pooled at the eot token
        hf = pair.hf.text_model(
            input_ids=ids, attention_mask=(ids != pair.ours.cfg.text.pad_id).long()
        )
        hidden = hf.last_hidden_state  # (B, L, W)
        pos = (ids == pair.ours.cfg.text.eot_id).int().argmax(-1)
        ref = hidden[torch.arange(len(ids)), pos]
    torch.testing.assert_close(
        F.normalize(ours, dim=-1), F.normalize(ref, dim=-1), atol=1e-4, rtol=0
    )


def test_siglip_pair_is_the_same_function_and_loss_as_hf_siglipmodel():
    """The SigLIP dims: HF's SiglipModel (from our export) holds the same weights, so the image
    and text embeddings and the sigmoid loss of the timed training step agree with polysense's."""
    import torch.nn.functional as F

    from polysense.losses import ContrastiveLoss
    from polysense.train.loop import _embed

    pair = tp.build_pair("siglip-tiny", batch=6, overrides=tp.QUICK_OVERRIDES)
    assert type(pair.hf).__name__ == "SiglipModel"
    assert pair.params == sum(p.numel() for p in pair.hf.parameters())
    with torch.no_grad():
        img, txt, o = _embed(pair.ours.eval(), pair.images, pair.ids, "fp32")
        ours = ContrastiveLoss(family="siglip")(img, txt, o["logit_scale"].log(), o["logit_bias"])
        out = pair.hf.eval()(input_ids=pair.ids, pixel_values=pair.images)
        hf_loss = ContrastiveLoss(family="siglip")(
            out.image_embeds, out.text_embeds, pair.hf.logit_scale, pair.hf.logit_bias
        )
    torch.testing.assert_close(img, F.normalize(out.image_embeds, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, F.normalize(out.text_embeds, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, hf_loss, atol=1e-5, rtol=0)
    # and HF's own loss (return_loss) is the same number
    torch.testing.assert_close(
        pair.hf(input_ids=pair.ids, pixel_values=pair.images, return_loss=True).loss.detach(),
        hf_loss,
        atol=1e-5,
        rtol=0,
    )


def test_inference_flops_match_the_hand_count(pair):
    """FlopCounterMode's count for encode_image equals the ViT's matmul FLOPs counted by hand."""
    v, e = pair.run.model.vision, pair.run.model.embed_dim
    n = (v.image_size // v.patch_size) ** 2
    t = n + 1  # cls token
    w, h = v.width, mlp_dim(v.width, v.mlp_ratio)
    patch = 2 * n * v.in_channels * v.patch_size**2 * w
    block = 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * 2 * t * w * h
    # the last block computes the cls token alone: its q, k, v for all t tokens, one query
    last = 2 * t * w * 3 * w + 2 * 2 * 1 * t * w + 2 * 1 * w * w + 2 * 2 * 1 * w * h
    expected = patch + (v.layers - 1) * block + last + 2 * w * e
    assert tp.count_flops(tp.ours_infer(pair)) == expected * len(pair.images)


@pytest.mark.parametrize("units", [True, False], ids=["bf16-units", "no-bf16-units"])
def test_throughput_bench_quick_writes_the_contract_shape(tmp_path, monkeypatch, units):
    """Both kinds of CPU: with bf16 units the bf16 variants and peak are measured; without them
    (an AVX2-only CPU, simulated by patching `native_bf16`) not one bf16 matmul runs, and the
    report says "no bf16 units"."""
    from polysense.precision import native_bf16

    if units and not native_bf16("cpu"):
        pytest.skip("this CPU has no bf16 units (the other case covers it)")
    dtypes: list[torch.dtype] = []
    real_peak = tp.matmul_peak
    monkeypatch.setattr(tp, "native_bf16", lambda device: units)
    monkeypatch.setattr(
        tp, "matmul_peak", lambda dtype, **kw: dtypes.append(dtype) or real_peak(dtype, **kw)
    )
    if not units:  # and "auto" must resolve to fp32, as it does on such a CPU, for the models too
        monkeypatch.setattr(tp, "resolve_precision", lambda precision, device: "fp32")
        monkeypatch.setattr(clip_module, "resolve_precision", lambda precision, device: "fp32")
    res = tp.run_throughput_bench(
        tmp_path,
        dims=("clip-tiny", "siglip-tiny"),
        batch={"clip-tiny": 8, "siglip-tiny": 8},
        repeats=2,
        quick=True,
    )
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert {"clip-tiny", "peak_gflops", "table", "environment"} <= set(data)
    tiny = data["clip-tiny"]
    rates = tiny["train_samples_per_s"]
    inf = tiny["infer_images_per_s"]
    hf_modes = ["hf_bf16", "hf_fp32"] if units else ["hf_fp32"]
    assert sorted(m for m in rates if m.startswith("hf")) == hf_modes
    if units:
        assert isinstance(data["peak_gflops"]["bf16"], float)
        assert torch.bfloat16 in dtypes
    else:
        assert data["peak_gflops"]["bf16"] == "no bf16 units"
        assert tiny["bf16"] == "skipped: no bf16 units" and tiny["mfu_bf16_peak"] is None
        assert torch.bfloat16 not in dtypes
        assert "polysense_fp32" not in rates  # polysense's auto is fp32 here: no duplicate row
        assert "no bf16 units" in (tmp_path / "throughput.md").read_text()
    best_hf = max(rates[m] for m in hf_modes)
    assert tiny["train_ratio_vs_hf"] == pytest.approx(rates["polysense"] / best_hf)
    best_inf = max(inf[m] for m in hf_modes)
    assert tiny["infer_ratio_vs_hf"] == pytest.approx(inf["polysense"] / best_inf)
    peak = data["peak_gflops"]["fp32"] * 1e9
    flops = tiny["train_flops_per_sample"]["polysense"]
    assert tiny["mfu"] == pytest.approx(flops * rates["polysense"] / peak)
    if tiny["ceiling_peak"] == "fp32":  # the ratio at the peak: peak / FLOPs over HF's rate
        inf_flops = tiny["infer_flops_per_sample"]["polysense"]
        assert tiny["infer_ceiling_vs_hf"] == pytest.approx(peak / inf_flops / best_inf)
        assert tiny["train_ceiling_vs_hf"] == pytest.approx(peak / flops / best_hf)
    # polysense skips padding columns, so its step counts fewer FLOPs than HF's at equal weights
    assert 0 < flops < tiny["train_flops_per_sample"]["hf"]
    assert len(tiny["seconds_train"]["polysense"]) == 2
    assert tiny["loader_samples_per_s"] > 0
    assert res["clip-tiny"]["params"] == tiny["params"]
    sig = data["siglip-tiny"]  # the SigLIP dims, against HF SiglipModel, in the same run
    assert sorted(m for m in sig["train_samples_per_s"] if m.startswith("hf")) == hf_modes
    best_sig = max(sig["infer_images_per_s"][m] for m in hf_modes)
    assert sig["infer_ratio_vs_hf"] == pytest.approx(
        sig["infer_images_per_s"]["polysense"] / best_sig
    )
    assert {r["dims"] for r in data["table"]} == {"clip-tiny", "siglip-tiny"}
    assert (tmp_path / "throughput.md").read_text().startswith("# Training and inference")
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_interleaved_is_bounded_by_time_not_by_the_repeat_count(monkeypatch):
    """A fake clock that advances 1 s per reading: with a 10 s bound the rounds stop once the
    rounds so far took over 10 s, after the 3-round minimum, far below the 1000 allowed."""
    clock = iter(range(10**6))
    monkeypatch.setattr(tp.time, "perf_counter", lambda: float(next(clock)))
    calls = {"a": 0, "b": 0}
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    times = tp.interleaved(fns, repeats=1000, seconds=10.0)
    # reading 0 starts the clock; each timed call reads it twice (4 readings a round); rounds
    # 0-2 are the minimum and check nothing; the check before round 3 reads 13: 13 s > 10 s.
    assert len(times["a"]) == len(times["b"]) == 3
    assert calls == {"a": 4, "b": 4}  # one warm-up call each, then 3 rounds
    assert all(t == 1.0 for t in times["a"])
    few = tp.interleaved(fns, repeats=2, seconds=0.001)
    assert len(few["a"]) == 2  # a count below the minimum is honoured
    assert len(tp.interleaved(fns, repeats=5)["a"]) == 5  # no bound: exactly the repeats


def test_square_bytes_lower_bounds():
    assert square_bytes("naive", 1024) == 2 * 8 * 1024**2
    assert square_bytes("dense", 1024) == 2 * 4 * 1024**2
    assert square_bytes("chunked", 1 << 20) == 0


@pytest.mark.slow
def test_loss_memory_chunked_fits_where_dense_does_not(tmp_path):
    """Under a 200 MiB cap at B=4096 (dim 32): naive is skipped (its two float64 B x B matrices
    alone are 256 MiB), the dense forms fail their allocation in the child, the chunked ones
    fit; at B=256 every form fits and all give the same loss value."""
    res = run_loss_memory_bench(
        tmp_path,
        sizes=(256, 4096),
        dim=32,
        chunk=256,
        chunks=(),
        budget_gib=200 / 1024,
        progress=False,
    )
    rows = json.loads((tmp_path / "loss-memory.json").read_text())["table"]
    by = {(r["loss"], r["form"], r["batch"], r["chunk"]): r for r in rows}
    for loss in ("clip", "siglip"):
        assert res["summary"][loss] == {
            "largest_naive_batch": 256,
            "largest_dense_batch": 256,
            "largest_chunked_batch": 4096,
        }
        assert by[(loss, "naive", 4096, None)]["note"].startswith("skipped")
        assert not by[(loss, "dense", 4096, None)]["fits"]
        chunked = by[(loss, "chunked", 4096, 256)]
        assert chunked["fits"] and 0 < chunked["peak_mib"] < 200
        small = [
            by[(loss, f, 256, c)]["loss_value"]
            for f, c in (("naive", None), ("dense", None), ("chunked", 256))
        ]
        assert max(small) - min(small) < 1e-4 * abs(small[0])
    assert (tmp_path / "loss-memory.png").is_file()


@pytest.mark.slow
def test_scaling_two_processes_follow_one(tmp_path):
    from polysense.bench.scaling import QUICK_SETS, run_scaling_bench
    from polysense.data.world import generate_world

    world = tmp_path / "world"
    generate_world(world, n=200, modalities=("image", "text"), progress=False, workers=1)
    # QUICK_SETS pin fp32: the check is that the distributed step computes the same sums; in
    # bf16 (the "auto" default on CPUs with AMX) each process's half batch rounds differently
    assert "train.precision=fp32" in QUICK_SETS
    res = run_scaling_bench(tmp_path / "out", data=world, sets=QUICK_SETS, nproc=2, threads=2)
    assert res["steps"] == list(range(1, 7))
    assert res["max_rel_loss_diff"] < 1e-4
    assert res["samples_per_s"]["1"] > 0 and res["samples_per_s"]["2"] > 0
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert "| processes |" in md


@pytest.mark.parametrize("name", ["throughput", "loss-memory", "scaling"])
def test_bench_commands_have_help_with_an_example(name):
    from typer.testing import CliRunner

    from polysense.cli import app

    result = CliRunner().invoke(app, ["bench", name, "--help"])
    assert result.exit_code == 0 and "Example" in result.output, result.output


def test_bench_command_errors_name_the_option(tmp_path):
    import subprocess
    import sys

    for args, message in (
        (["throughput", "--dims", " , "], "--dims"),
        (["throughput", "--repeats", "0"], "--repeats"),
        (["loss-memory", "--chunk", "0"], "--chunk"),
        (["scaling", "--nproc", "1"], "--nproc"),
    ):
        cmd = [sys.executable, "-m", "polysense.cli"]
        cmd += ["bench", *args, "--out", str(tmp_path)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_time_to_target_is_the_first_curve_point_that_reaches_it():
    from polysense.bench.quickstart import time_to

    curve = [
        {"step": 100, "elapsed_s": 10.0, "val_zeroshot_top1": 0.5},
        {"step": 200, "elapsed_s": 21.0, "val_zeroshot_top1": 0.96},
        {"step": 300, "elapsed_s": 30.5, "val_zeroshot_top1": 0.94},
        {"step": 400, "elapsed_s": 41.0, "val_zeroshot_top1": 0.99},
    ]
    assert time_to(curve, 0.95) == 21.0
    assert time_to(curve, 0.99) == 41.0
    assert time_to(curve, 0.995) is None


def test_bench_quickstart_writes_the_curves_of_the_runs(tmp_path):
    """A tiny run of `bench quickstart`: the curve in the report is the run's own val log, and
    bf16 is run exactly where the CPU multiplies bf16 natively."""
    from helpers import TINY
    from polysense.bench.quickstart import run_quickstart_bench, time_to
    from polysense.data.world import generate_world
    from polysense.precision import native_bf16

    world = tmp_path / "world"
    generate_world(world, n=400, modalities=("image", "text"), progress=False)
    sets = (*(o for o in TINY if not o.startswith("train.steps")), "train.steps=8")
    res = run_quickstart_bench(
        tmp_path / "out", world=world, target=0.01, eval_every=4, overrides=sets
    )
    fp32 = res["runs"]["fp32"]
    log = [
        json.loads(line)
        for line in (tmp_path / "out" / "quickstart-fp32" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    own_log = [{k: r[k] for k in fp32["curve"][0]} for r in log if "val_zeroshot_top1" in r]
    assert fp32["curve"] == own_log and set(own_log[0]) == {
        "step",
        "elapsed_s",
        "val_zeroshot_top1",
    }
    assert [p["step"] for p in fp32["curve"]] == [4, 8] and fp32["steps"] == 8
    assert fp32["seconds_to_target"] == time_to(fp32["curve"], 0.01)  # its first point
    if native_bf16("cpu"):
        assert [p["step"] for p in res["runs"]["bf16"]["curve"]] == [4, 8]
    else:
        assert res["runs"]["bf16"] == {"skipped": "no bf16 units"}
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"quickstart.{ext}").stat().st_size > 0


@pytest.mark.slow
def test_compiled_inference_equals_eager_follows_new_weights_and_is_benched(pair):
    """`inference_compile`: encode_image through torch.compile gives the eager embeddings, still
    does after the weights change (they are graph inputs, not constants), and bench throughput's
    compiled row reports its own rate and compile time."""
    import copy

    model = copy.deepcopy(pair.ours).eval()
    x = pair.images
    with torch.no_grad():
        eager = model.encode_image(x)
        model.inference_compile = True
        torch.testing.assert_close(model.encode_image(x), eager, atol=1e-5, rtol=0)
        for p in model.visual.parameters():
            p.mul_(0.5)
        model.inference_compile = False
        halved = model.encode_image(x)
        model.inference_compile = True
        torch.testing.assert_close(model.encode_image(x), halved, atol=1e-5, rtol=0)
    assert not torch.allclose(halved, eager, atol=1e-3)

    peaks = {"fp32": tp.matmul_peak(torch.float32, sizes=(64,), seconds=0.02)["gflops"]}
    res, rows = tp.bench_dims(
        "clip-tiny", batch=4, repeats=2, peaks=peaks, overrides=tp.QUICK_OVERRIDES, compiled=True
    )
    rate = res["infer_images_per_s"]
    assert res["infer_compiled_ratio_vs_hf"] == pytest.approx(
        rate["polysense_compiled"] / rate[res["hf_best_infer_mode"]]
    )
    assert res["compile_seconds"] > 0
    assert any(r["variant"] == "polysense_compiled" and r["step"] == "infer" for r in rows)

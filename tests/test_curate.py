"""Curation: counts that add up, dedup and leak recall on an injected corpus, resume, manifests,
the searches against brute force, and the per-stage rules."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polysense.data.curate import (
    ContaminationConfig,
    CurateConfig,
    FilterConfig,
    RecaptionConfig,
    cosine_pairs,
    hamming_pairs,
    run_curate,
    train_probe,
    verify_manifest,
)
from polysense.data.curate import stages as st
from polysense.data.curate.captioners import template_caption
from polysense.data.noisy import build_noisy_corpus, read_truth, score_dedup, score_leaks
from polysense.data.world import generate_world
from polysense.errors import DataError, PolysenseError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, n=1000, seed=3, modalities=("image", "text"), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy")
    build_noisy_corpus(world, out, n_base=300, shard_size=64, seed=1)
    return out


def tar_keys(directory: Path) -> list[str]:
    """Sample keys of every shard, read with tarfile directly (not the curate reader)."""
    keys = []
    for shard in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def full_config(corpus: Path, out: Path, world: Path, **changes) -> CurateConfig:
    cfg = CurateConfig(
        source=str(corpus),
        out=str(out),
        ckpt="clip-tiny",  # a randomly initialised model: enough to exercise the embedding paths
        shard_size=64,
        filter=FilterConfig(top_fraction=0.9),
        recaption=RecaptionConfig(mix_ratio=0.5),
        contamination=ContaminationConfig(eval_source=str(world), eval_splits=("test",)),
    )
    return dataclasses.replace(cfg, **changes)


def test_counts_add_up_over_all_stages(corpus, world, tmp_path):
    out = tmp_path / "cur"
    report = run_curate(full_config(corpus, out, world))
    n_corpus = len(read_truth(corpus))
    assert report["input"] == n_corpus
    drops = 0
    previous = None
    for name, s in report["stages"].items():
        assert s["in"] == s["kept"] + sum(s["dropped"].values()), name
        if previous is not None:
            assert s["in"] == previous["kept"], name
        previous = s
        drops += sum(s["dropped"].values())
    assert report["input"] == report["output"] + drops
    # independent recount: the shards on disk, and one rejects line per dropped sample
    kept = tar_keys(out)
    assert len(kept) == report["output"] == len(set(kept))
    lines = rejects(out)
    assert len(lines) == drops
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["stage_order"] == ["read", *CurateConfig().stages]
    assert on_disk["stages"] == report["stages"]
    assert all({"key", "stage", "reason", "score"} <= set(r) for r in lines)
    assert set(kept).isdisjoint(r["key"] for r in lines)
    assert set(kept) | {r["key"] for r in lines} == {t["key"] for t in read_truth(corpus)}
    # every stage dropped what it is for
    st_ = report["stages"]
    assert st_["safety"]["dropped"].get("blocklist", 0) > 0
    assert st_["filter"]["dropped"].get("low_similarity", 0) > 0
    assert set(st_["dedup"]["dropped"]) <= {"exact", "perceptual", "embedding"}
    verify_manifest(out)


def test_dedup_recall_and_false_positives(corpus, tmp_path):
    out = tmp_path / "dedup"
    cfg = CurateConfig(source=str(corpus), out=str(out), stages=("dedup",), shard_size=64)
    report = run_curate(cfg)
    dropped = {r["key"] for r in rejects(out) if r["stage"] == "dedup"}
    score = score_dedup(read_truth(corpus), dropped)
    assert score["injected"] == 60
    assert score["recall"] >= 0.95, score
    assert score["false_positive_rate"] <= 0.01, score
    assert report["stages"]["dedup"]["kept"] == len(tar_keys(out))


def test_dedup_is_deterministic_and_keeps_the_first(tmp_path):
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    other = Image.new("RGB", (32, 32), (40, 40, 200))
    rows = [("a", img, "a red square"), ("b", other, "a blue square"), ("c", img, "a red square")]
    lines = []
    for key, im, cap in rows:
        im.save(tmp_path / f"{key}.png")
        lines.append(json.dumps({"key": key, "image": f"{key}.png", "caption": cap}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    for run in ("x", "y"):
        cfg = CurateConfig(source=str(tmp_path / "d.jsonl"), out=str(tmp_path / run))
        run_curate(dataclasses.replace(cfg, stages=("dedup",)))
        assert tar_keys(tmp_path / run) == ["a", "b"]
        (rej,) = rejects(tmp_path / run)
        assert (rej["key"], rej["reason"], rej["detail"]) == ("c", "exact", "duplicate of a")


def test_contamination_finds_leaks(corpus, world, tmp_path):
    out = tmp_path / "leaks"
    cfg = CurateConfig(
        source=str(corpus),
        out=str(out),
        stages=("contamination",),
        shard_size=64,
        contamination=ContaminationConfig(eval_source=str(world), eval_splits=("test",)),
    )
    run_curate(cfg)
    flagged = {r["key"] for r in rejects(out)}
    score = score_leaks(read_truth(corpus), flagged)
    assert score["injected"] == 9
    assert score["recall"] >= 0.95, score
    assert score["false_positive_rate"] <= 0.01, score
    report_only = dataclasses.replace(
        cfg,
        out=str(tmp_path / "keep"),
        contamination=dataclasses.replace(cfg.contamination, remove=False),
    )
    report = run_curate(report_only)
    assert report["output"] == report["input"]
    found = [
        json.loads(x) for x in (tmp_path / "keep" / "contamination.jsonl").read_text().splitlines()
    ]
    assert {f["key"] for f in found} == flagged


def test_resume_after_interruption(corpus, world, tmp_path, monkeypatch):
    # every stage but the embedding-based ones (slow here, covered by the test above)
    cfg = full_config(corpus, tmp_path / "ref", world, ckpt="", filter=FilterConfig())
    cfg = dataclasses.replace(cfg, stages=("dedup", "filter", "safety", "recaption", "shard"))
    reference = run_curate(cfg)
    calls = Counter()
    original = st._APPLY["safety"]

    def crash_on_third_shard(task, items):
        calls[task.src] += 1
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(task, items)

    monkeypatch.setitem(st._APPLY, "safety", crash_on_third_shard)
    interrupted = dataclasses.replace(cfg, out=str(tmp_path / "int"))
    with pytest.raises(KeyboardInterrupt):
        run_curate(interrupted)
    assert not (tmp_path / "int" / "report.json").exists()
    monkeypatch.setitem(st._APPLY, "safety", original)
    resumed = run_curate(interrupted)
    assert resumed["stages"] == {
        k: {
            **v,
            "samples_per_s": resumed["stages"][k]["samples_per_s"],
            "seconds": resumed["stages"][k]["seconds"],
        }
        for k, v in reference["stages"].items()
    }
    keys = tar_keys(tmp_path / "int")
    assert len(keys) == len(set(keys)) == reference["output"]
    assert sorted(keys) == sorted(tar_keys(tmp_path / "ref"))
    assert len(rejects(tmp_path / "int")) == len(rejects(tmp_path / "ref"))


def test_shard_stage_shuffles_globally_with_checksums(corpus, tmp_path):
    out = tmp_path / "sh"
    cfg = CurateConfig(source=str(corpus), out=str(out), stages=("shard",), shard_size=50)
    cfg = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, shard_size=40, seed=5))
    report = run_curate(cfg)
    manifest = verify_manifest(out)
    n = len(read_truth(corpus))
    assert manifest["count"] == report["output"] == n
    counts = [s["count"] for s in manifest["shards"]]
    assert counts[:-1] == [40] * (len(counts) - 1) and sum(counts) == n
    # the output order is the seeded permutation of the input order
    with open(out / "work" / "01-shard" / "perm.npy", "rb") as fh:
        perm = np.load(fh)
    source = tar_keys(out / "work" / "00-read")  # sorted per shard; shards hold 50 in order
    source_order = []
    for shard in sorted((out / "work" / "00-read").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            source_order += list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    assert sorted(source) == sorted(source_order)
    expected = [""] * n
    for i, p in enumerate(perm):
        expected[p] = source_order[i]
    got = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            got += list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    assert got == expected
    # a flipped byte is caught
    first = out / manifest["shards"][0]["path"]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        verify_manifest(out)


def test_process_pool_gives_the_same_shards(corpus, tmp_path):
    cfg = CurateConfig(source=str(corpus), out=str(tmp_path / "one"), stages=("dedup", "shard"))
    cfg = dataclasses.replace(cfg, shard_size=64)
    run_curate(cfg)
    run_curate(dataclasses.replace(cfg, out=str(tmp_path / "two"), workers=2))
    assert (
        verify_manifest(tmp_path / "one")["shards"] == verify_manifest(tmp_path / "two")["shards"]
    )


def _bits(codes: np.ndarray) -> np.ndarray:
    return np.unpackbits(codes, axis=1).astype(np.int32)


@pytest.mark.parametrize("flat_limit", [10**9, 0])
def test_hamming_pairs_match_brute_force(flat_limit):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (300, 8), dtype=np.uint8)
    flips = np.unpackbits(base, axis=1)
    near = flips.copy()
    for row in near[:100]:
        row[rng.choice(64, rng.integers(0, 6), replace=False)] ^= 1
    codes = np.concatenate([base, np.packbits(near[:100], axis=1)])
    q, d, dist = hamming_pairs(codes, codes, 4, flat_limit=flat_limit)
    b = _bits(codes)
    ref = (b[:, None, :] != b[None, :, :]).sum(-1)
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(ref <= 4), strict=True)}
    assert {(int(i), int(j)) for i, j in zip(q, d, strict=True)} == want
    assert np.array_equal(dist, ref[q, d].astype(np.float32))


def test_cosine_pairs_exact_and_ivf():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x[1000:1200] = x[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(sims >= 0.95), strict=True)}
    q, d, s = cosine_pairs(x, x, 0.95)
    assert {(int(i), int(j)) for i, j in zip(q, d, strict=True)} == want
    np.testing.assert_allclose(s, sims[q, d], atol=1e-5)
    q, d, _ = cosine_pairs(x, x, 0.95, exact_limit=0, nprobe=8)  # IVF: approximate
    got = {(int(i), int(j)) for i, j in zip(q, d, strict=True)}
    assert got <= want and len(got) >= 0.95 * len(want)


def test_filter_rules():
    cfg = CurateConfig()
    assert st.caption_problem("a red circle", cfg) is None
    assert st.caption_problem("IMG_0001.JPG", cfg) == "caption_too_short"
    assert st.caption_problem("DSC01234 ### 0123", cfg) == "caption_not_language"
    assert st.caption_problem(" ".join(["word"] * 65), cfg) == "caption_too_long"


def test_blocklist_matches_whole_words(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# comment\nbad word\ngore\n")
    pattern = st._blocklist_re(str(words))
    assert pattern.search("a Bad Word here")
    assert pattern.search("gore, red circle")
    assert not pattern.search("a gorected circle")  # inside another word
    assert not pattern.search("bad wording")
    with pytest.raises(PolysenseError, match="not found"):
        st.read_blocklist(tmp_path / "missing.txt")


def test_template_captioner_and_mix_ratio(corpus, tmp_path):
    caption = template_caption(
        {
            "objects": [
                {"size": "small", "color": "red", "shape": "circle", "position": "top left"},
                {"size": "large", "color": "blue", "shape": "star", "position": "center"},
            ]
        }
    )
    assert caption == (
        "two shapes: a small red circle at the top left and a large blue star in the center"
    )
    assert template_caption({"objects": []}) is None
    out = tmp_path / "recap"
    cfg = CurateConfig(
        source=str(corpus),
        out=str(out),
        stages=("recaption",),
        shard_size=64,
        recaption=RecaptionConfig(mix_ratio=0.4, seed=2),
    )
    run_curate(cfg)
    metas = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    assert all(m["caption_synthetic"] == template_caption(m) for m in metas)
    mixed = [m for m in metas if "captions_original" in m]
    assert all(m["captions"] == [m["caption_synthetic"]] for m in mixed)
    assert abs(len(mixed) / len(metas) - 0.4) < 0.06


def test_probe_flags_what_it_was_trained_on():
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(16)
    x = rng.standard_normal((400, 16))
    y = (x @ direction > 0.5).astype(np.float32)
    probe = train_probe(x[:300], y[:300])
    pred = probe([None] * 100, x[300:]) >= 0.5
    assert (pred == (y[300:] == 1)).mean() >= 0.95


def test_score_functions_on_hand_made_truth():
    truth = [
        {"key": "a", "kind": "clean", "of": None},
        {"key": "a1", "kind": "near_dup", "of": "a"},
        {"key": "a2", "kind": "near_dup", "of": "a"},
        {"key": "b", "kind": "clean", "of": None},
        {"key": "l", "kind": "leak", "of": None},
    ]
    s = score_dedup(truth, {"a", "a2"})  # two of the group gone: both count
    assert (s["recall"], s["false_positives"]) == (1.0, 0)
    s = score_dedup(truth, {"a1", "b"})
    assert (s["recall"], s["false_positives"]) == (0.5, 1)
    assert score_dedup(truth, {"a", "a1", "a2"})["false_positives"] == 1  # nothing left of a
    s = score_leaks(truth, {"l", "b"})
    assert (s["recall"], s["false_positive_rate"]) == (1.0, 0.25)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(PolysenseError, match=r"contamination\.eval_source"):
        run_curate(CurateConfig(source="x", out=str(tmp_path), stages=("contamination",)))
    with pytest.raises(PolysenseError, match="ckpt"):
        cfg = CurateConfig(source="x", out=str(tmp_path), filter=FilterConfig(min_similarity=0.5))
        run_curate(dataclasses.replace(cfg, stages=("filter",)))
    with pytest.raises(PolysenseError, match="last stage"):
        run_curate(CurateConfig(source="x", out=str(tmp_path), stages=("shard", "dedup")))


def test_resume_after_interruption_while_reading(tmp_path, monkeypatch):
    import polysense.data.readers as readers
    from helpers import make_pairs

    pairs = make_pairs(tmp_path / "pairs", 50)
    with pairs.open("a") as fh:  # two bad lines: the reader's rejects must not double on resume
        fh.write('{"image": "missing.png", "caption": "a red circle"}\nnot json\n')
    cfg = CurateConfig(source=str(pairs), out=str(tmp_path / "ref"), stages=("safety",))
    cfg = dataclasses.replace(cfg, shard_size=8)
    reference = run_curate(cfg)
    real = readers.read_samples

    def dies_after_20(*args, **kwargs):
        for n, sample in enumerate(real(*args, **kwargs)):
            if n == 20:
                raise KeyboardInterrupt("simulated kill")
            yield sample

    monkeypatch.setattr(readers, "read_samples", dies_after_20)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        run_curate(cut)
    assert len(list((tmp_path / "cut" / "work" / "00-read").glob("*.done.json"))) == 2
    monkeypatch.setattr(readers, "read_samples", real)
    resumed = run_curate(cut)
    assert resumed["input"] == reference["input"] == 52
    assert resumed["stages"]["read"]["dropped"] == {"bad_json": 1, "missing_file": 1}
    assert tar_keys(tmp_path / "cut") == tar_keys(tmp_path / "ref")
    assert len(tar_keys(tmp_path / "cut")) == 50


def test_plan_filter_threshold_and_top_fraction():
    keys = ["a", "b", "c", "d", "e"]
    sims = np.array([0.9, 0.2, np.nan, 0.5, 0.7], dtype=np.float32)
    fixed = st.plan_filter(keys, sims, CurateConfig(filter=FilterConfig(min_similarity=0.6)))
    assert fixed.keys == ["b", "d"] and fixed.reasons == ["low_similarity"] * 2
    np.testing.assert_allclose(fixed.scores, [0.2, 0.5])
    # the best half of the 4 scored samples: 0.9 and 0.7 (no score, no verdict: "c" stays)
    top = st.plan_filter(keys, sims, CurateConfig(filter=FilterConfig(top_fraction=0.5)))
    assert top.keys == ["b", "d"]
    assert 0.5 < top.threshold <= 0.7


def test_resume_refuses_a_different_config(tmp_path):
    from helpers import make_pairs

    pairs = make_pairs(tmp_path / "pairs", 12)
    cfg = CurateConfig(source=str(pairs), out=str(tmp_path / "o"), stages=("safety",))
    run_curate(cfg)
    run_curate(dataclasses.replace(cfg, workers=2))  # how it runs may change
    with pytest.raises(PolysenseError, match="different config"):
        run_curate(dataclasses.replace(cfg, stages=("dedup",)))


def test_embedding_batch_size_does_not_change_the_filter(corpus, tmp_path, capsys):
    """`--batch-size` only regroups the forward passes: the similarity filter keeps and drops the
    same samples with 5 images a pass as with 256; a device this machine lacks, or a batch of 0,
    is a one-line error naming the option."""
    from test_cli_errors import assert_one_line_error, run_cli

    base = dict(source=str(corpus), stages=("filter",), ckpt="clip-tiny", shard_size=64)
    base["filter"] = FilterConfig(top_fraction=0.8)
    a = run_curate(CurateConfig(out=str(tmp_path / "a"), **base))
    b = run_curate(CurateConfig(out=str(tmp_path / "b"), embed_batch=5, **base))
    assert a["stages"]["filter"]["dropped"] == b["stages"]["filter"]["dropped"]
    assert tar_keys(tmp_path / "a") == tar_keys(tmp_path / "b")
    ra = {r["key"]: r["score"] for r in rejects(tmp_path / "a")}
    rb = {r["key"]: r["score"] for r in rejects(tmp_path / "b")}
    assert ra.keys() == rb.keys()
    scored = [k for k in ra if ra[k] is not None]  # the similarity rejects (rules have none)
    # equal up to the rounding of bf16 inference (precision "auto" on a CPU with bf16 units)
    assert scored and all(abs(ra[k] - rb[k]) < 2e-3 for k in scored)

    args = ("data", "filter", str(corpus), "--out", str(tmp_path / "c"), "--ckpt", "clip-tiny")
    code, _, err = run_cli(capsys, *args, "--device", "cuda:7")
    assert_one_line_error(code, err, "device 'cuda:7'", "CUDA device(s)")
    code, _, err = run_cli(capsys, *args, "--batch-size", "0")
    assert_one_line_error(code, err, "embed_batch=0")

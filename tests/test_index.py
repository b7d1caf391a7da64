"""The embedding index: counts, exact search vs a numpy reference, add == rebuild, crash safety,
reopen, dedup, argument errors, approximate-index recall."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_pairs, tiny_config
from polysense import load as polysense_load
from polysense.data.readers import Rejects, read_samples
from polysense.data.world import generate_world
from polysense.errors import DataError, PolysenseError
from polysense.index import MAX_K, EmbeddingIndex, Hit, ann, build_index, store
from polysense.models.checkpoint import save_checkpoint
from polysense.models.clip import build_model


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, n=400, seed=0, modalities=("image", "text"), progress=False)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    # mean pooling keeps a random model's embeddings apart (cls/eot pooling nearly collapses them)
    pools = ("model.vision.pool=mean", "model.text.pool=mean", "model.text.context_length=32")
    # fp32 checkpoint: these tests check that the index stores exactly the model's embeddings
    # (batch for batch, add vs rebuild); bf16 inference (the "auto" default on AMX CPUs) agrees
    # only to ~1e-3 across batch shapes, a property of the model, not of the index
    cfg = tiny_config("clip-tiny", *pools, "train.precision=fp32")
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def index(tmp_path_factory, ckpt, world) -> EmbeddingIndex:
    out = tmp_path_factory.mktemp("idx") / "index"
    return build_index(ckpt, world, out, split="test", batch_size=16, progress=False)


def _queries(dim: int, n: int = 6, seed: int = 0) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)  # (n, D)


def _check_against_bruteforce(idx: EmbeddingIndex, queries: np.ndarray, k: int, modality: str):
    """Every result list is an exact top-k of inner products over the stored embeddings."""
    emb = np.asarray(idx.embeddings(modality))  # (N, D)
    results = idx.search(queries, k=k, modality=modality)
    for q, hits in zip(queries, results, strict=True):
        ref = emb @ q  # (N,)
        top = np.sort(ref)[::-1][: min(k, len(emb))]
        rows = [h.row for h in hits]
        assert len(rows) == len(top) and len(set(rows)) == len(rows)
        np.testing.assert_allclose([h.score for h in hits], top, atol=1e-5)
        np.testing.assert_allclose([h.score for h in hits], ref[rows], atol=1e-5)
        assert all(h.modality == modality for h in hits)


def test_every_item_and_caption_is_indexed(index, world):
    samples = list(read_samples(world, split="test"))
    assert len(index) == len(samples) > 0
    assert index.n_texts == sum(len(s["text"]) for s in samples)
    assert index.meta["counts"] == {"items": len(samples), "texts": index.n_texts}
    for s in samples:
        item = index.item(s["key"])
        assert item["captions"] == s["text"] and item["objects"] == s["objects"]
        png = Image.open(io.BytesIO(index.image_bytes(s["key"])))
        assert png.format == "PNG" and np.array_equal(np.asarray(png), np.asarray(s["image"]))
    assert index.item("no-such-key") is None and index.image_bytes("no-such-key") is None
    # Stored rows are the model's embeddings of those very samples, in reading order.
    with torch.inference_mode():
        img = index.model.encode_image([s["image"] for s in samples[:5]]).numpy()
        txt = index.model.encode_text(samples[0]["text"]).numpy()
    np.testing.assert_allclose(index.embeddings("image")[:5], img, atol=1e-5)
    np.testing.assert_allclose(index.embeddings("text")[: len(txt)], txt, atol=1e-5)
    assert (Path(index.directory) / "rejects.jsonl").read_text() == ""


def test_search_equals_numpy_bruteforce(index):
    for modality in ("image", "text"):
        _check_against_bruteforce(index, _queries(index.dim), 7, modality)
    # k above the index size returns everything, still sorted
    _check_against_bruteforce(index, _queries(index.dim, 2), MAX_K, "image")
    # text queries go through the model, then the same search
    with torch.inference_mode():
        q = index.model.encode_text(["a red circle", "two blue squares"]).numpy()
    assert index.search_text(["a red circle", "two blue squares"], k=5) == index.search(q, k=5)
    hits = index.search_text("a red circle", k=5, modality="text")[0]
    for h in hits:  # a text hit carries the caption it matched, owned by its key
        assert h.caption in index.item(h.key)["captions"]
    image = Image.open(io.BytesIO(index.image_bytes(hits[0].key)))
    top = index.search_image([image], k=1)[0][0]  # an image finds itself first
    assert top.key == hits[0].key and top.score == pytest.approx(1.0, abs=1e-5)


def _assert_same_results(a: EmbeddingIndex, b: EmbeddingIndex, modality: str) -> None:
    """Both indexes rank every row alike: same rows, keys, captions, scores (to 1e-5)."""
    q = _queries(a.dim, 4, seed=1)
    n = len(a.embeddings(modality))
    for hits_a, hits_b in zip(*(x.search(q, k=n, modality=modality) for x in (a, b)), strict=True):
        by_row = {h.row: h for h in hits_b}
        assert sorted(by_row) == sorted(h.row for h in hits_a) == list(range(n))
        for h in hits_a:
            other = by_row[h.row]
            assert (h.key, h.caption) == (other.key, other.caption)
            assert h.score == pytest.approx(other.score, abs=1e-5)
        in_b = [by_row[h.row].score for h in hits_a]  # a's order, b's scores: still descending
        assert all(x >= y - 1e-5 for x, y in itertools.pairwise(in_b))


def test_add_equals_full_rebuild(tmp_path, ckpt, world):
    added = build_index(ckpt, world, tmp_path / "a", split="val", progress=False)
    before = added.search(_queries(added.dim), k=5)
    n_test = sum(1 for _ in read_samples(world, split="test"))
    assert added.add(world, split="test", batch_size=8, progress=False) == n_test
    # the union of both splits as one folder of tar shards, val first
    union = tmp_path / "union"
    union.mkdir()
    for i, split in enumerate(("val", "test")):
        for shard in sorted((world / split).glob("*.tar")):
            shutil.copy(shard, union / f"{i}-{shard.name}")
    rebuilt = build_index(ckpt, union, tmp_path / "b", progress=False)
    assert (len(added), added.n_texts) == (len(rebuilt), rebuilt.n_texts)
    for modality in ("image", "text"):
        np.testing.assert_allclose(
            added.embeddings(modality), rebuilt.embeddings(modality), atol=1e-5
        )
        _assert_same_results(added, rebuilt, modality)
        _check_against_bruteforce(added, _queries(added.dim), 5, modality)
    assert len(EmbeddingIndex.open(tmp_path / "a")) == len(rebuilt)
    assert [s["split"] for s in added.meta["sources"]] == ["val", "test"]
    # adding the same data again adds nothing new: every key is a duplicate
    with pytest.raises(DataError, match=f"duplicate_key: {n_test}"):
        added.add(world, split="test", progress=False)
    assert added.search(_queries(added.dim), k=5) != before  # the new rows do take part


def test_failed_build_or_add_keeps_previous_index(tmp_path, ckpt, world, monkeypatch):
    out = tmp_path / "index"
    first = build_index(ckpt, world, out, split="test", limit=12, progress=False)
    expected = first.search(_queries(first.dim), k=5)

    def crash(tmp, out):
        assert (tmp / "meta.json").is_file()  # the new index was completely written
        raise RuntimeError("killed")

    monkeypatch.setattr(store, "_swap_in", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(ckpt, world, out, split="val", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        first.add(world, split="val", progress=False)
    assert first.search(_queries(first.dim), k=5) == expected  # the open index still answers
    reopened = EmbeddingIndex.open(out)
    assert len(reopened) == 12 and reopened.search(_queries(first.dim), k=5) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary left over


def test_kill_between_renames_recovers(tmp_path, ckpt, world, monkeypatch):
    out = tmp_path / "index"
    first = build_index(ckpt, world, out, split="test", limit=12, progress=False)
    expected = first.search(_queries(first.dim), k=5)
    calls = []
    real_rename = os.rename

    def rename(src, dst):  # the live index moves aside, then the process "dies"
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        build_index(ckpt, world, out, split="val", progress=False)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and (tmp_path / ".index.old" / "meta.json").is_file()
    recovered = EmbeddingIndex.open(out)
    assert recovered.search(_queries(first.dim), k=5) == expected
    # the other half: new index in place, old one not yet removed
    shutil.copytree(out, tmp_path / ".index.old")
    assert len(EmbeddingIndex.open(out)) == 12 and not (tmp_path / ".index.old").exists()


def test_reopen_gives_same_results(index):
    reopened = EmbeddingIndex.open(index.directory)  # model loaded lazily from the checkpoint
    for modality in ("image", "text"):
        q = _queries(index.dim, 3)
        assert reopened.search(q, k=6, modality=modality) == index.search(q, k=6, modality=modality)
    assert reopened.search_text(["a small red circle"], k=4) == index.search_text(
        ["a small red circle"], k=4
    )
    assert reopened.meta["checkpoint"] == str(Path(index.meta["checkpoint"]).resolve())


def _reference_dedup(emb: np.ndarray, q: np.ndarray, k: int, threshold: float) -> list[float]:
    """Greedy suppression over the full exact ranking: the scores of the kept rows."""
    scores = emb @ q
    kept: list[int] = []
    for row in np.argsort(-scores, kind="stable"):
        if all(float(emb[row] @ emb[j]) < threshold for j in kept):
            kept.append(row)
        if len(kept) == k:
            break
    return [float(scores[r]) for r in kept]


def test_dedup_suppresses_near_duplicates(index):
    emb = np.asarray(index.embeddings("text"))  # (M, D)
    row = int((emb @ emb.T >= 0.95).sum(1).argmax())  # the caption with most near-duplicates
    q = emb[row]
    plain = index.search(q[None], k=5, modality="text")[0]
    vecs = emb[[h.row for h in plain]]
    assert (vecs @ vecs.T - 2 * np.eye(5)).max() >= 0.95  # without dedup they come back
    for threshold in (0.95, 0.5, 0.05):
        hits = index.search(q[None], k=5, modality="text", dedup=threshold)[0]
        vecs = emb[[h.row for h in hits]]
        assert (vecs @ vecs.T - 2 * np.eye(len(hits))).max() < threshold
        ref = _reference_dedup(emb, q, 5, threshold)  # over all captions, not just 4k fetched
        np.testing.assert_allclose([h.score for h in hits], ref, atol=1e-5)
        if threshold == 0.95:
            assert len(hits) == 5  # enough distinct captions exist: k results
    caption = index.search(q[None], k=1, modality="text")[0][0].caption
    # Encoding one caption alone and in the index's batches agrees to float noise (batches are
    # trimmed to their longest caption), which may swap near-tied neighbours: compare scores.
    by_text = index.search_text(caption, k=5, modality="text", dedup=0.95)[0]
    by_vector = index.search(q[None], k=5, modality="text", dedup=0.95)[0]
    assert by_text[0].key == by_vector[0].key
    np.testing.assert_allclose([h.score for h in by_text], [h.score for h in by_vector], atol=1e-4)


def test_argument_errors(index, tmp_path):
    q = _queries(index.dim, 1)
    for k in (0, -1, MAX_K + 1, 2.5, True, "5"):
        with pytest.raises(PolysenseError, match="k="):
            index.search(q, k=k)
    with pytest.raises(PolysenseError, match="modality='audio'"):
        index.search(q, k=1, modality="audio")
    for dedup in (0, 1.5, float("nan"), -0.2):
        with pytest.raises(PolysenseError, match="dedup="):
            index.search(q, k=1, dedup=dedup)
    with pytest.raises(PolysenseError, match=f"\\(Q, {index.dim}\\)"):
        index.search(np.zeros((1, index.dim + 1), np.float32), k=1)
    with pytest.raises(PolysenseError, match="NaN"):
        index.search(np.full((1, index.dim), np.nan, np.float32), k=1)
    with pytest.raises(PolysenseError, match="non-empty strings"):
        index.search_text([""], k=1)
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        EmbeddingIndex.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a polysense index"):
        EmbeddingIndex.open(tmp_path / "empty")
    with pytest.raises(PolysenseError, match="index_type='annoy'"):
        build_index("x", "y", tmp_path / "z", index_type="annoy")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PolysenseError, match="refusing to replace"):
        build_index(index.meta["checkpoint"], "y", tmp_path / "mine")
    broken = tmp_path / "broken"
    shutil.copytree(index.directory, broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        EmbeddingIndex.open(broken)


def test_bad_samples_go_to_rejects(tmp_path, ckpt):
    data = make_pairs(tmp_path / "pairs", 6)
    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"image": "gone.png", "caption": "a lost image"})
    for name in ("a.png", "b.png"):  # two more images (rows naming one image would merge)
        shutil.copyfile(data.parent / "2.png", data.parent / name)
    lines.append(json.dumps({"key": "dup", "image": "a.png", "caption": "first"}))
    lines.append(json.dumps({"key": "dup", "image": "b.png", "caption": "second"}))
    data.write_text("\n".join(lines) + "\n")
    idx = build_index(ckpt, data, tmp_path / "index", progress=False)
    rejects = [
        json.loads(x) for x in (tmp_path / "index" / "rejects.jsonl").read_text().splitlines()
    ]
    assert sorted(r["reason"] for r in rejects) == ["duplicate_key", "missing_file"]
    assert len(idx) == 6 and idx.item("dup")["captions"] == ["first"]
    assert idx.meta["sources"][0]["rejected"] == 2


def _mixture(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 random centres (clustered, like real embeddings)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, d)).astype(np.float32)
    x = centers[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, d)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(kind):
    points = _mixture(20_300, 32, 0)
    data, queries = points[:20_000], points[20_000:]  # held-out queries, same distribution
    index, params = ann.build(data, kind)
    assert index.ntotal == len(data) and params["tuned_recall"] >= ann.TARGET_RECALL
    exact, exact_ids = ann.exact_topk(data, queries, 10)
    approx, ids = ann.search(index, params, queries, 10)
    assert (ids >= 0).all()
    # tuned with a margin on held-out stored vectors: fresh queries still reach the target
    assert ann.recall_at_k(approx, exact, 10) >= ann.TARGET_RECALL
    # faiss ids are rows: an exhaustive setting returns exactly the brute-force ids
    everything = {**params, "nprobe": params.get("nlist"), "ef_search": 1024}
    exhaustive_ids = ann.search(index, everything, queries, 10)[1]
    assert (exhaustive_ids[:, 0] == exact_ids[:, 0]).mean() > 0.99
    if kind == "ivf":  # one list is not enough here: the tuning had something to do
        cheapest = {**params, "nprobe": 1}
        assert ann.recall_at_k(ann.search(index, cheapest, queries, 10)[0], exact, 10) < 0.9


def test_tuning_covers_queries_from_the_other_modality():
    points = _mixture(12_000, 32, 0)
    shifted = _mixture(300, 32, 0) + 0.7  # same clusters, displaced: a "modality gap"
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    index, tuned = ann.build(points, "ivf", cross_queries=shifted)
    exact, _ = ann.exact_topk(points, shifted, 10)
    assert ann.recall_at_k(ann.search(index, tuned, shifted, 10)[0], exact, 10) >= 0.95
    assert ann.choose_type(ann.FLAT_MAX) == "flat" and ann.choose_type(ann.FLAT_MAX + 1) == "ivf"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_end_to_end(tmp_path, ckpt, world, kind):
    idx = build_index(ckpt, world, tmp_path / "i", split="test", index_type=kind, progress=False)
    assert idx.add(world, split="val", progress=False) == sum(
        1 for _ in read_samples(world, split="val")
    )
    assert {p["type"] for p in idx.meta["index"].values()} == {kind}
    # image -> text queries, the cross-modal set the re-tuning after `add` covered
    emb, q = np.asarray(idx.embeddings("text")), np.asarray(idx.embeddings("image"))
    exact, _ = ann.exact_topk(emb, q, 10)
    hits = idx.search(q, k=10, modality="text")
    approx = np.array([[h.score for h in row] for row in hits])
    assert ann.recall_at_k(approx, exact, 10) >= ann.TARGET_RECALL


def test_hit_is_frozen_and_import_is_light():
    hit = Hit(key="a", score=0.5, caption=None, modality="image", row=0)
    with pytest.raises(AttributeError):
        hit.key = "b"  # type: ignore[misc]
    code = "import sys, polysense, polysense.index; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _messy_pairs(root: Path) -> Path:
    """25 images (sizes 32 and 40x24, so resize and crop both run) with 4 bad rows among them:
    a missing file, a file that is not an image, a truncated PNG, and a repeated key."""
    data = make_pairs(root, 21)
    Image.new("RGB", (40, 24), (10, 200, 30)).save(root / "wide.png")
    (root / "text.png").write_bytes(b"not an image at all")
    (root / "cut.png").write_bytes((root / "3.png").read_bytes()[:60])
    shutil.copyfile(root / "5.png", root / "again.png")
    extra = [
        {"image": "gone.png", "caption": "a lost image"},
        {"image": "wide.png", "caption": "a green wide image"},
        {"image": "text.png", "caption": "not an image"},
        {"image": "cut.png", "caption": "a cut image"},
        {"key": "4.png", "image": "again.png", "caption": "a repeated key"},
    ]
    lines = data.read_text().splitlines()
    for pos, row in zip((2, 9, 13, 17, 24), extra, strict=True):  # spread over the batches
        lines.insert(pos, json.dumps(row))
    data.write_text("\n".join(lines) + "\n")
    return data


def _rejects(index_dir: Path) -> list[str]:
    lines = (index_dir / "rejects.jsonl").read_text().splitlines()
    return sorted(json.loads(x)["reason"] for x in lines)


@pytest.mark.parametrize(("workers", "batch", "limit"), [(0, 4, None), (2, 3, None), (2, 5, 14)])
def test_decode_workers_give_the_one_process_embeddings(tmp_path, ckpt, workers, batch, limit):
    """Images decoded in DataLoader workers give the vectors, order, limit and rejects of the
    one-process path: `read_samples` (decoded in this process) + `encode_image` on PIL images."""
    data = _messy_pairs(tmp_path / "pairs")
    reader_rejects = Rejects()
    samples = list(read_samples(data, rejects=reader_rejects, limit=limit))
    keys = [s["key"] for s in samples]
    unique = [s for i, s in enumerate(samples) if s["key"] not in keys[:i]]
    model = polysense_load(ckpt)
    with torch.inference_mode():
        want = model.encode_image([s["image"] for s in unique]).numpy()  # (N, D)
    idx = build_index(
        ckpt, data, tmp_path / "index", batch_size=batch, num_workers=workers, limit=limit,
        progress=False,
    )  # fmt: skip
    assert (
        [idx.item(s["key"])["row"] for s in unique]
        == list(range(len(unique)))
        == list(range(len(idx)))
    )
    np.testing.assert_allclose(idx.embeddings("image"), want, atol=1e-5)
    for s in unique:  # the stored PNG is the decoded source image
        png = np.asarray(Image.open(io.BytesIO(idx.image_bytes(s["key"]))))
        assert np.array_equal(png, np.asarray(s["image"]))
    want_reasons = [r["reason"] for r in reader_rejects.records]
    want_reasons += ["duplicate_key"] * (len(samples) - len(unique))
    assert _rejects(idx.directory) == sorted(want_reasons)
    assert idx.meta["sources"][0]["rejected"] == len(want_reasons)
    assert "undecodable_image" in want_reasons and "missing_file" in want_reasons


def test_embed_options_are_checked(tmp_path, ckpt, world):
    for kwargs, flag in (
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "--num-workers -1"),
        ({"device": "tpu"}, "--device 'tpu'"),
        ({"device": "cuda:7"}, "--device 'cuda:7'"),
    ):
        with pytest.raises(PolysenseError, match=re.escape(flag)):
            build_index(ckpt, world, tmp_path / "x", progress=False, **kwargs)
    missing = tmp_path / "missing.csv"  # raised here, not wrapped by a worker's traceback
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))} does not exist[^\n]*$"):
        build_index(ckpt, missing, tmp_path / "y", progress=False, num_workers=2)


@pytest.mark.parametrize("resize", ["shortest_edge", "square"])
def test_worker_preprocess_equals_images_to_tensor(resize):
    """The workers' image-by-image preprocessing gives `CLIP.preprocess`'s tensor bit for bit."""
    from polysense.data.transforms import CLIP_MEAN, CLIP_STD, images_to_tensor
    from polysense.index.embed import Preprocess

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((24, 40), (50, 30), (32, 32))
    ]
    images += [Image.new("RGBA", (20, 36), (200, 10, 30, 90)), Image.new("L", (33, 33), 77)]
    got = Preprocess(size=32, mean=CLIP_MEAN, std=CLIP_STD, resize=resize)(images)
    want = images_to_tensor(images, size=32, mean=CLIP_MEAN, std=CLIP_STD, resize=resize)
    assert got.shape == want.shape == (5, 3, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_error_in_a_worker_is_the_original_one_line_error(tmp_path, ckpt, monkeypatch):
    """A source that fails mid-stream inside a DataLoader worker raises the reader's own error
    in the main process (one line), not the DataLoader's wrapped traceback."""
    from polysense.index import embed

    data = make_pairs(tmp_path / "pairs", 9)
    real = embed.read_samples

    def failing(*args, **kwargs):
        for i, sample in enumerate(real(*args, **kwargs)):
            if i == 6:
                raise DataError(f"{data}: line 7: the file changed while being read")
            yield sample

    monkeypatch.setattr(embed, "read_samples", failing)
    model = polysense_load(ckpt)
    options = embed.EmbedOptions(batch_size=2, num_workers=2)
    with pytest.raises(DataError) as info:
        list(embed.embed_files(model, data, options=options, rejects=Rejects()))
    assert str(info.value) == f"{data}: line 7: the file changed while being read"


def test_auto_workers_uses_only_cores_the_model_leaves(monkeypatch):
    """Default decode workers: the CPUs the model's torch threads leave (at most 4) on the CPU,
    min(4, CPUs) for a GPU; an explicit count is kept."""
    from polysense.index import embed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cpus, threads, on_cpu, on_gpu in ((2, 2, 0, 2), (8, 2, 4, 4), (6, 4, 2, 4), (1, 2, 0, 1)):
        monkeypatch.setattr(embed.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)))
        monkeypatch.setattr(embed.torch, "get_num_threads", lambda t=threads: t)
        assert embed.auto_workers(cpu) == on_cpu
        assert embed.auto_workers(cuda) == on_gpu
        options = embed.EmbedOptions(num_workers=3)
        assert embed.check_options(options) == (cpu, 3)
        assert embed.check_options(embed.EmbedOptions()) == (cpu, on_cpu)


def test_index_build_compile_runs_the_tower_through_torch_compile(
    tmp_path, ckpt, capsys, monkeypatch
):
    """`polysense index build --compile` embeds through `torch.compile` (recorded here by a
    stand-in that runs the module as it is; the compiled kernels' equality with eager is
    test_perf_bench's) and stores the eager build's vectors."""
    from polysense.models import clip as clip_module
    from test_cli_errors import run_cli

    compiled = []

    class Recorded(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module
            compiled.append(module)

        def forward(self, *args):
            return self._orig_mod(*args)

    monkeypatch.setattr(clip_module.torch, "compile", Recorded)
    data = _messy_pairs(tmp_path / "pairs")
    eager = build_index(ckpt, data, tmp_path / "eager", batch_size=4, progress=False)
    assert not compiled
    code, _, err = run_cli(
        capsys, "index", "build", "--ckpt", str(ckpt), "--data", str(data),
        "--out", str(tmp_path / "compiled"), "--batch-size", "4", "--compile",
    )  # fmt: skip
    assert code == 0, err
    assert compiled and {type(m).__name__ for m in compiled} >= {"VisionTransformer"}
    built = EmbeddingIndex.open(tmp_path / "compiled")
    assert len(built) == len(eager)
    np.testing.assert_allclose(built.embeddings("image"), eager.embeddings("image"), atol=1e-6)

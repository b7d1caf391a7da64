"""The streaming data pipeline (polysense.data.pipeline): epoch batches against a hand-decoded
reference, the decoded cache against streaming, rank/worker splits, augmentation, bounded
memory, the resampled mode, and kill -9 + --resume of a streamed run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, get_worker_info

from helpers import cli_train, tiny_config
from polysense.config import ConfigError
from polysense.data.loader import PairBatches, PairData
from polysense.data.pipeline import ShardPairs, caption_lists, open_pairs, step_batches
from polysense.data.streaming import PairRecipe, ResampledStepData
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import CLIP_MEAN, CLIP_STD, Augment, resize_center_crop, train_image
from polysense.errors import DataError
from polysense.train.loop import build_tokenizer

N_SHARDS, PER_SHARD = 3, 16  # 48 samples


def colour(i: int) -> tuple[int, int, int]:
    """A colour that names sample i (read back from a solid image at the model's size)."""
    return (5 * i, 255 - 5 * i, (37 * i) % 256)


def write_shards(root: Path, *, size: tuple[int, int] = (20, 28), solid: bool = False) -> Path:
    """N_SHARDS tars of PER_SHARD samples: a PNG (a solid colour naming the sample, or a pattern
    that resizing changes) and captions in .txt or .json, some naming a side."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(N_SHARDS):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for k in range(PER_SHARD):
                i = s * PER_SHARD + k
                w, h = size
                if solid:
                    pixels = np.broadcast_to(np.uint8(colour(i)), (h, w, 3))
                else:
                    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
                caps = [f"sample {i} red", f"the {i} blue one"]
                if i % 3 == 0:
                    caps.append(f"a dot left of sample {i}")
                if i % 2:
                    text = (".json", json.dumps({"caption": caps}).encode())
                else:
                    text = (".txt", caps[0].encode())
                for ext, data in ((".png", buf.getvalue()), text):
                    info = tarfile.TarInfo(f"s{i:04d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def solid_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("solid"), size=(16, 16), solid=True)


def config(*overrides: str):
    return tiny_config("clip-tiny", "model.vision.image_size=16", *overrides)


@pytest.fixture(scope="module")
def tok(shards) -> Tokenizer:
    return build_tokenizer(config(), caption_lists(open_source(shards, "data.cache=on")))


def open_source(path: Path, *overrides: str):
    cfg = config(*overrides)
    return open_pairs(path, data=cfg.data, model=cfg.model, split=None)


def batches(path: Path, tok: Tokenizer, *overrides: str, rank: int = 0, world: int = 1, seed=3):
    cfg = config(*overrides)
    source = open_pairs(path, data=cfg.data, model=cfg.model, split=None)
    return step_batches(
        source,
        data=cfg.data,
        model=cfg.model,
        tokenizer=tok,
        batch_size=8,
        seed=seed,
        rank=rank,
        world=world,
    )


def naive_samples(path: Path) -> list[tuple[Image.Image, list[str]]]:
    """Every sample of the shards, read with tarfile and decoded by hand, in tar order."""
    out = []
    for shard in sorted(path.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".png")):
            stem = name[: -len(".png")]
            image = Image.open(io.BytesIO(members[name])).convert("RGB")
            if stem + ".txt" in members:
                caps = [members[stem + ".txt"].decode()]
            else:
                caps = json.loads(members[stem + ".json"])["caption"]
            out.append((image, caps))
    return out


def test_epoch_batches_equal_a_hand_decoded_reference(shards, tok):
    """Streamed (2 workers) batches of steps 0..7 (an epoch boundary at 6) equal the samples
    decoded by hand in the epoch order: permutation seeded by (seed, epoch), caption drawn by
    (seed, step), PIL resize + centre crop, (x / 255 - mean) / std."""
    samples, seed, b = naive_samples(shards), 3, 8
    stream = batches(shards, tok, "data.cache=off", "data.num_workers=2", seed=seed)
    for step in range(8):
        epoch, j = divmod(step, len(samples) // b)
        perm = torch.randperm(
            len(samples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
        idx = perm[j * b : (j + 1) * b]
        u = torch.rand(b, generator=torch.Generator().manual_seed(seed * 7_919 + step))
        pixels, texts = [], []
        for k, i in enumerate(idx.tolist()):
            image, caps = samples[i]
            texts.append(caps[int(u[k] * len(caps))])
            pixels.append(np.asarray(resize_center_crop(image, 16), dtype=np.float32) / 255.0)
        want = (np.stack(pixels) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
        images, ids = stream.batch(step)
        torch.testing.assert_close(
            images, torch.from_numpy(want).permute(0, 3, 1, 2), rtol=0, atol=1e-6
        )
        assert torch.equal(ids, tok.encode(texts)[0])
    stream.close()


@pytest.mark.parametrize("world", [1, 2])
def test_cached_and_streamed_batches_are_identical(shards, tok, world):
    """The decoded cache (PairBatches) and the streamed epoch mode give the same tensors, bit for
    bit, for every rank, also after a jump (a resume) to a later step."""
    for rank in range(world):
        cached = batches(shards, tok, "data.cache=on", rank=rank, world=world)
        streamed = batches(
            shards, tok, "data.cache=off", "data.num_workers=2", rank=rank, world=world
        )
        assert isinstance(cached, PairBatches) and not isinstance(streamed, PairBatches)
        for step in (0, 1, 2, 9, 10, 4):
            a, b = cached.batch(step), streamed.batch(step)
            assert a[0].shape == (8 // world, 3, 16, 16)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (rank, step)
        streamed.close()


class WorkerTagged(Dataset):
    """Item s of `inner`, with the id of the DataLoader worker that made it."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __getitem__(self, step: int):
        return get_worker_info().id, self.inner[step]


def test_ranks_and_workers_cover_every_sample_once_per_epoch(solid_shards, tok):
    """2 ranks x 2 workers: one epoch's batches (each sample named by its solid colour) hold
    every sample exactly once, both workers work, and the next epoch is a new order."""
    cfg = config("data.cache=off")
    source = open_pairs(solid_shards, data=cfg.data, model=cfg.model, split=None)
    steps_per_epoch = len(source.index) // 8
    epochs: list[list[list[int]]] = [[], []]  # per epoch, per rank: the samples seen
    workers = set()
    for rank in range(2):
        stream = step_batches(
            source,
            data=cfg.data,
            model=cfg.model,
            tokenizer=tok,
            batch_size=8,
            seed=1,
            rank=rank,
            world=2,
        )
        dataset = stream.open_at(0).dataset
        loader = DataLoader(
            WorkerTagged(dataset),
            batch_size=None,
            sampler=range(2 * steps_per_epoch),
            num_workers=2,
        )
        for epoch in epochs:
            epoch.append([])
        for step, (worker, raw) in enumerate(loader):
            workers.add(worker)
            for image in raw["image"].numpy():
                i = next(i for i in range(48) if tuple(image[0, 0]) == colour(i))
                assert (image == np.uint8(colour(i))).all()
                epochs[step // steps_per_epoch][rank].append(i)
    for epoch in epochs:
        assert sorted(epoch[0] + epoch[1]) == list(range(48))
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert workers == {0, 1}


def test_augmentation_is_a_function_of_seed_and_step(shards, tok):
    """Crop + jitter + flip: the same (seed, step) gives the same batch with any worker count,
    and each rank's slice equals its part of the one-process batch; another seed differs."""
    aug = ("data.cache=off", "data.crop_scale_min=0.4", "data.jitter=0.3", "data.flip=true")
    one = batches(shards, tok, *aug, "data.num_workers=0")
    two = batches(shards, tok, *aug, "data.num_workers=2")
    other = batches(shards, tok, *aug, "data.num_workers=0", seed=4)
    halves = [batches(shards, tok, *aug, "data.num_workers=0", rank=r, world=2) for r in (0, 1)]
    plain = batches(shards, tok, "data.cache=off", "data.num_workers=0")
    for step in (0, 1, 7):
        a, b = one.batch(step), two.batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(torch.cat([h.batch(step)[0] for h in halves]), a[0])
        assert not torch.equal(a[0], plain.batch(step)[0])  # the augmentation did something
    assert not torch.equal(one.batch(3)[0], other.batch(3)[0])
    two.close()


def test_flip_never_mirrors_a_caption_that_names_a_side():
    """An image red on the left, blue on the right: with a "left of" caption no seed flips it;
    without one, about half the seeds do, and a flipped image is the mirror of the unflipped."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    aug = Augment(flip=True)

    def run(captions, seed):
        rng = np.random.default_rng(seed)
        return train_image(
            image, size=16, resize="shortest_edge", augment=aug, rng=rng, captions=captions
        )

    for seed in range(40):
        assert (run(["a red square left of a blue square"], seed) == pixels).all()
        assert (run(["the blue one is on the Right"], seed) == pixels).all()
    results = [run(["a red and a blue square"], seed) for seed in range(40)]
    flipped = [not (r == pixels).all() for r in results]
    assert 8 < sum(flipped) < 32
    assert all((r == pixels[:, ::-1]).all() for r, f in zip(results, flipped, strict=True) if f)


def test_streamed_source_holds_no_pixels_and_auto_streams_over_budget(shards):
    """Memory bound: a streamed source holds its index and caption counts only (the same bytes
    at 16 px as at 224 px, under 200 bytes a sample), while data.cache=auto picks the decoded
    cache under data.cache_max_gb and streams above it."""
    small = open_source(shards, "data.cache=off")
    large = open_source(shards, "data.cache=off", "model.vision.image_size=224")
    assert isinstance(small, ShardPairs) and isinstance(large, ShardPairs)
    held = [s.index.nbytes for s in (small, large)]
    assert held[0] == held[1] < 200 * len(small.index)
    arrays = [v for v in vars(small.index).values() if isinstance(v, np.ndarray)]
    assert all(a.dtype.kind in "iU" and a.ndim == 1 for a in arrays)  # no image-shaped array
    # 48 samples x 16 x 16 x 3 = 36,864 bytes decoded: the budget decides
    assert isinstance(open_source(shards, "data.cache=auto", "data.cache_max_gb=4e-5"), PairData)
    assert isinstance(open_source(shards, "data.cache=auto", "data.cache_max_gb=3e-5"), ShardPairs)
    assert isinstance(open_source(shards, "data.cache=auto", "data.flip=true"), ShardPairs)


def test_tables_must_be_sharded_to_stream(pairs_jsonl):
    """A JSONL source streams only once converted to shards; over the cache budget it says so."""
    with pytest.raises(DataError, match="polysense data shard"):
        open_source(pairs_jsonl, "data.cache=off")
    with pytest.raises(DataError, match=r"data\.cache_max_gb"):
        open_source(pairs_jsonl, "data.cache=auto", "data.cache_max_gb=1e-5")
    with pytest.raises(ConfigError, match=r"data\.cache=auto or off"):
        open_source(pairs_jsonl, "data.cache=on", "data.jitter=0.2")


def test_resampled_mode_draws_shard_samples_reproducibly(shards, tok):
    """Resampled batches: the right shapes, samples of the set (ids of its captions), the same
    stream for the same (seed, rank, start step) and a different one for another start."""
    cfg = config("data.sampling=resampled", "data.shuffle_buffer=8")
    source = open_pairs(shards, data=cfg.data, model=cfg.model, split=None)
    assert source.index is None and len(source.urls) == N_SHARDS
    url = f"pipe:cat {shards}/shard-00000{{0..2}}.tar"  # a remote-style URL: resampled only
    assert open_pairs(url, data=cfg.data, model=cfg.model, split=None).urls == tuple(
        f"pipe:cat {shards}/shard-00000{k}.tar" for k in range(3)
    )
    with pytest.raises(DataError, match=r"data\.sampling=resampled"):
        open_source(url, "data.cache=off")
    captions = {c for caps in caption_lists(open_source(shards, "data.cache=on")) for c in caps}
    allowed = {tuple(row) for row in tok.encode(sorted(captions))[0].tolist()}
    recipe = PairRecipe(tokenizer=tok, image_size=16, resize="shortest_edge", augment=Augment())

    def first(start, n=3):
        data = ResampledStepData(
            urls=source.urls,
            batch=4,
            buffer=8,
            seed=0,
            rank=0,
            start=start,
            recipe=recipe,
            image_key="image",
            caption_key="caption",
        )
        return [(b["image"], b["text"]) for _, b in zip(range(n), data, strict=False)]

    a, b, c = first(0), first(0), first(5)
    for (x, ids), (y, ids2) in zip(a, b, strict=True):
        assert x.shape == (4, 16, 16, 3) and x.dtype == torch.uint8
        assert torch.equal(x, y) and torch.equal(ids, ids2)
        assert {tuple(r) for r in ids.tolist()} <= allowed
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c, strict=True))
    stream = step_batches(
        source, data=cfg.data, model=cfg.model, tokenizer=tok, batch_size=8, seed=0
    )
    images, ids = stream.batch(0)
    assert images.shape == (8, 3, 16, 16) and ids.shape == (8, 16)
    stream.close()


def test_streamed_training_equals_cached_training(solid_shards, tmp_path):
    """A few steps trained streamed (2 workers) and from the decoded cache: the same weights."""
    from polysense.train.loop import train

    runs = {}
    for cache in ("on", "off"):
        cfg = config(f"data.cache={cache}", "data.num_workers=2", "train.steps=4")
        out = tmp_path / cache
        train(cfg, data=solid_shards, out=out, progress=False)
        runs[cache] = load_file(out / "model.safetensors")
    for key, value in runs["on"].items():
        assert torch.equal(value, runs["off"][key]), key


def _cli_train(data: Path, out: Path, *extra: str) -> list[str]:
    return cli_train(data, out, *extra, sets=("model.vision.image_size=16",))


@pytest.mark.slow
def test_kill_minus_9_during_a_streamed_run_then_resume_is_bitwise_equal(shards, tmp_path):
    """Streamed (data.cache=off, 2 workers): kill -9 after a checkpoint, --resume, and the final
    weights equal an uninterrupted streamed run's bit for bit; no log step lost or doubled."""
    steps = [
        "--set",
        "train.steps=120",
        "--set",
        "train.ckpt_every=10",
        "--set",
        "train.log_every=10",
        "--set",
        "data.cache=off",
        "--set",
        "data.num_workers=2",
    ]
    ref = subprocess.run(
        _cli_train(shards, tmp_path / "ref", *steps), capture_output=True, text=True, timeout=600
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli_train(shards, out, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if (
            (out / "state.pt").exists()
            and metrics.exists()
            and len(metrics.read_text().splitlines()) >= 3
        ):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 0 < saved < 120
    resumed = subprocess.run(
        _cli_train(shards, out, *steps, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(10, 121, 10))


def test_bench_dataloader_mechanics(tmp_path):
    """Both loaders of `bench dataloader` pass over the same samples in batches of the same
    shape, and the report's figures are its own runs' medians and their ratio (no speed asserted)."""
    import statistics

    from polysense.bench.dataloader import run_dataloader_bench

    res = run_dataloader_bench(tmp_path, samples=64, size=32, batch=8, workers=1, rounds=2)
    for name in ("polysense", "webdataset"):
        runs = res["runs"][name]
        assert len(runs) == 2
        assert all(r["samples"] == 64 and r["shape"] == [8, 32, 32, 3] for r in runs)
        rate = statistics.median(r["samples"] / r["seconds"] for r in runs)
        assert res[f"{name}_samples_per_s"] == pytest.approx(rate, rel=1e-12)
    want = res["polysense_samples_per_s"] / res["webdataset_samples_per_s"]
    assert res["ratio"] == pytest.approx(want, rel=1e-12)
    saved = json.loads((tmp_path / "dataloader.json").read_text())
    assert saved["ratio"] == pytest.approx(res["ratio"], rel=1e-12)
    assert (tmp_path / "dataloader.md").is_file() and (tmp_path / "dataloader.png").is_file()
    assert not list(tmp_path.glob(".dataloader-shards-*"))  # its own shards are deleted


def test_synthetic_shards_caption_what_they_draw(tmp_path):
    """The bench's synthetic samples: 320x256 JPEGs whose caption names two shapes left to right,
    and whose left half holds the first shape's colour."""
    from polysense.bench.dataloader import COLOURS, write_synthetic_shards

    (path,) = write_synthetic_shards(tmp_path, n=6, per_shard=6)
    for image, caps in naive_samples_jpg(path):
        assert image.size == (320, 256)
        first, _, second = caps[0].partition(" left of ")
        colour = first.split()[1]
        assert second.startswith("a ") and colour in COLOURS
        left = np.asarray(image)[:, :160].reshape(-1, 3).astype(int)
        near = np.abs(left - np.array(COLOURS[colour])).sum(axis=1) < 40  # JPEG noise
        assert near.sum() > 100


def naive_samples_jpg(path: Path) -> list[tuple[Image.Image, list[str]]]:
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return [
        (Image.open(io.BytesIO(members[n])).convert("RGB"), [members[n[:-4] + ".txt"].decode()])
        for n in sorted(members)
        if n.endswith(".jpg")
    ]


def test_auto_takes_a_manifest_count_without_indexing(tmp_path, monkeypatch):
    """A world's manifest lists its split sizes: data.cache=auto decides from that count (the
    quickstart's start-up stays as it was) and indexes only when the count is over budget."""
    import polysense.data.pipeline as pipeline
    from polysense.data.world import generate_world

    generate_world(tmp_path / "w", n=60, modalities=("image", "text"), progress=False)
    real = pipeline.build_index
    monkeypatch.setattr(pipeline, "build_index", lambda *a, **k: pytest.fail("indexed"))
    cached = open_source(tmp_path / "w", "data.cache=auto")
    assert isinstance(cached, PairData) and len(cached) == 48  # the world's 80% train split
    monkeypatch.setattr(pipeline, "build_index", real)
    streamed = open_source(tmp_path / "w", "data.cache=auto", "data.cache_max_gb=1e-6")
    assert isinstance(streamed, ShardPairs) and len(streamed.index) == 48
    assert list(streamed.index.keys) == cached.keys  # the same samples in the same order


@pytest.fixture(scope="module")
def av_world(tmp_path_factory) -> Path:
    from polysense.data.world import generate_world

    root = tmp_path_factory.mktemp("av") / "w"
    generate_world(root, n=50, modalities=("image", "text", "audio", "video"), progress=False)
    return root


@pytest.mark.parametrize(
    ("preset", "hard"),
    [
        ("video-clip-tiny", "motion"),
        ("imagebind-tiny", "none"),
        ("av-tiny", "none"),
        ("clap-tiny", "none"),
    ],
)
def test_towers_stream_the_cache_batches(av_world, preset, hard):
    """Audio/video towers: streamed batches (2 workers) equal the tower cache's (TowerBatches)
    bit for bit, hard negatives and towers without text included, for 2 ranks."""
    from polysense.data.loader import TowerBatches

    sizes = (
        "model.video.image_size=16",
        "model.video.num_frames=4",
        "model.audio.clip_seconds=0.5",
        "model.text.context_length=32",  # the motion captions keep their direction
    )
    tok = None
    for rank in range(2):
        got = {}
        for cache in ("on", "off"):
            cfg = tiny_config(preset, *sizes, f"data.cache={cache}", "data.num_workers=2")
            source = open_pairs(av_world, data=cfg.data, model=cfg.model, split=None)
            if tok is None and "text" in cfg.model.towers:
                tok = build_tokenizer(cfg, caption_lists(source))
            got[cache] = step_batches(
                source,
                data=cfg.data,
                model=cfg.model,
                tokenizer=tok if "text" in cfg.model.towers else None,
                batch_size=8,
                seed=2,
                hard_negatives=hard,
                rank=rank,
                world=2,
            )
        assert isinstance(got["on"], TowerBatches) and not isinstance(got["off"], TowerBatches)
        for step in (0, 1, 6, 2):
            a, b = got["on"].batch(step), got["off"].batch(step)
            assert list(a) == list(b)  # the same inputs, in the same order
            assert ("hard_text" in a) == (hard == "motion")
            for name in a:
                assert torch.equal(a[name], b[name]), (preset, rank, step, name)
        got["off"].close()


def test_towers_refuse_what_they_cannot_stream(av_world):
    """Tower models stream in the epoch mode only, without augmentation."""
    for extra in ("data.sampling=resampled", "data.flip=true"):
        cfg = tiny_config("clap-tiny", extra)
        with pytest.raises(ConfigError, match=r"data\.sampling=epoch"):
            open_pairs(av_world, data=cfg.data, model=cfg.model, split=None)


def test_a_bad_image_is_replaced_by_the_next_sample_and_limit_keeps_the_first(tmp_path, tok):
    """Streaming reads headers only, so an undecodable image shows up in a worker: its row holds
    the next sample of the index instead (with a warning), the batch still a function of the
    step; data.limit=N streams the first N samples."""
    root = write_shards(tmp_path / "bad", size=(16, 16), solid=True)
    with tarfile.open(root / "shard-000000.tar") as tar:  # rewrite shard 0, sample 5 broken
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for info, data in members:
            data = b"not a png" if info.name == "s0005.png" else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = batches(root, tok, "data.cache=off", "data.num_workers=0", seed=1)
    order = stream.open_at(0).dataset.order
    step = next(s for s in range(6) if 5 in order.global_batch(s)[0].tolist())
    row = order.global_batch(step)[0].tolist().index(5)
    with pytest.warns(UserWarning, match="s0005"):
        raw = stream.open_at(step).dataset[step]
    assert (raw["image"][row].numpy() == np.uint8(colour(6))).all()
    limited = open_source(root, "data.cache=off", "data.limit=10")
    assert list(limited.index.keys) == [f"s{i:04d}" for i in range(10)]


def test_streaming_rejects_what_the_reader_rejects(tmp_path):
    """A broken caption member: streaming leaves the sample out and writes the same rejects
    (key, reason, shard) as the cached reader does on the same shards."""
    root = write_shards(tmp_path / "shards", size=(16, 16), solid=True)
    with tarfile.open(root / "shard-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / "shard-000001.tar", "w") as tar:
        for info, data in members:
            data = b'{"caption": ["unclosed' if info.name == "s0017.json" else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    found = {}
    for cache in ("on", "off"):
        cfg = config(f"data.cache={cache}")
        path = tmp_path / f"rejects-{cache}.jsonl"
        source = open_pairs(root, data=cfg.data, model=cfg.model, split=None, rejects_path=path)
        keys = list(source.keys if cache == "on" else source.index.keys)
        assert "s0017" not in keys and len(keys) == 47
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        found[cache] = [(r["key"], r["reason"], Path(r["source"]).name) for r in lines]
    assert found["off"] == found["on"] == [("s0017", "bad_json", "shard-000001.tar")]


def test_cli_trains_on_remote_style_shards_as_the_python_api_does(shards, tmp_path, capsys):
    """`--data pipe:...` (any URL) reaches the trainer as the URL: the weights equal those of
    `train(cfg, data=URL)`; without the resampled mode, or for another family, a one-line error."""
    from polysense.config import apply_overrides
    from polysense.presets import get_preset
    from polysense.train.loop import train
    from test_cli_errors import assert_one_line_error, run_cli

    url = f"pipe:cat {shards}/shard-00000{{0..2}}.tar"
    sets = ("data.sampling=resampled", "train.steps=3", "train.batch_size=8")
    sets += ("data.num_workers=0", "data.shuffle_buffer=8")
    args = ["train", "clip-tiny", "--data", url, "--out", str(tmp_path / "cli")]
    code, out, err = run_cli(capsys, *args, *(a for s in sets for a in ("--set", s)))
    assert code == 0, err
    assert "is a remote source, so no split was evaluated" in out
    cfg = apply_overrides(get_preset("clip-tiny"), list(sets))  # what the CLI builds
    train(cfg, data=url, out=tmp_path / "api", progress=False)
    a = load_file(tmp_path / "cli" / "model.safetensors")
    b = load_file(tmp_path / "api" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "--set data.sampling=resampled")
    code, _, err = run_cli(capsys, "train", "lm-tiny", "--data", url, "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "remote shards stream to the contrastive presets")

"""Failures of the environment and of the user's values are one-line CLI errors (exit 2, the
file or field named with the fix, no traceback), and they come before any work is done: a
read-only --out, a full disk, out-of-range --set values, a bad .bin, a mistyped --eval-splits,
an unsupported world --size (issue 21, defect 8).

The commands run in this process through `polysense.cli.main` (the entry point, which maps
errors to one line), so that a read-only directory and a full disk can be simulated with
monkeypatch: the tests run as root in CI, which ignores permission bits."""

from __future__ import annotations

import builtins
import errno
import io
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY, make_pairs, tiny_config
from polysense import cli
from polysense.models.checkpoint import save_checkpoint
from polysense.models.clip import build_model

TINY_SETS = [a for o in TINY for a in ("--set", o)]
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`polysense ARGS` in this process: (exit status, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["polysense", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def make_read_only(monkeypatch, directory: Path) -> None:
    """What the kernel does for a read-only `directory`: EACCES from every call that would
    create or open for writing a file or directory inside it (reads still work)."""
    root = directory.resolve()

    def inside(path) -> bool:
        p = Path(os.fsdecode(path)).absolute()
        return p == root or root in p.parents

    def deny(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def open_(file, mode="r", *args, **kwargs):
        path_like = isinstance(file, str | bytes | os.PathLike)
        if path_like and set(mode) & set("wax+") and inside(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and inside(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            deny(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), 40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config("clip-tiny", "train.precision=fp32")
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt"))


# ------------------------------------------------------------------ read-only --out


def test_train_into_a_read_only_out(capsys, monkeypatch, tmp_path, pairs):
    make_read_only(monkeypatch, tmp_path / "ro")
    code, _, err = run_cli(
        capsys, "train", "clip-tiny", "--data", str(pairs), "--out", str(tmp_path / "ro/run")
    )
    assert_one_line_error(code, err, str(tmp_path / "ro"), "--out", "Permission denied")


def test_world_generate_into_a_read_only_out(capsys, monkeypatch, tmp_path):
    make_read_only(monkeypatch, tmp_path / "ro")
    out = tmp_path / "ro" / "world"
    code, _, err = run_cli(capsys, "world", "generate", "--out", str(out), "--n", "20")
    assert_one_line_error(code, err, str(tmp_path / "ro"), "--out")


def test_index_build_into_a_read_only_out(capsys, monkeypatch, tmp_path, ckpt, pairs):
    (tmp_path / "ro").mkdir()
    make_read_only(monkeypatch, tmp_path / "ro")
    out = tmp_path / "ro" / "index"
    code, _, err = run_cli(
        capsys, "index", "build", "--ckpt", str(ckpt), "--data", str(pairs), "--out", str(out)
    )
    assert_one_line_error(code, err, str(tmp_path / "ro"), "--out")


def test_index_add_beside_a_read_only_index(capsys, monkeypatch, tmp_path, ckpt, pairs):
    from polysense.index import build_index

    index = tmp_path / "ro" / "index"
    build_index(ckpt, pairs, index, progress=False, limit=4)
    make_read_only(monkeypatch, tmp_path / "ro")
    code, _, err = run_cli(capsys, "index", "add", "--index", str(index), "--data", str(pairs))
    assert_one_line_error(code, err, str(tmp_path / "ro"), "--index")


def test_data_inspect_with_a_read_only_rejects_path(capsys, monkeypatch, tmp_path, pairs):
    make_read_only(monkeypatch, tmp_path / "ro")
    code, _, err = run_cli(
        capsys,
        "data",
        "inspect",
        str(pairs),
        "--rejects",
        str(tmp_path / "ro" / "rejects.jsonl"),
        "--sheet",
        str(tmp_path / "sheet.png"),
    )
    assert_one_line_error(code, err, str(tmp_path / "ro"), "cannot write here")


# ------------------------------------------------------------------ a full disk


def test_full_disk_in_the_index_store_is_one_line(capsys, monkeypatch, tmp_path, ckpt, pairs):
    """SQLite's own 'database or disk is full' (a page cap makes it real), during the build."""
    real_connect = sqlite3.connect

    def small_disk(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.execute("PRAGMA max_page_count=5")  # the schema's 5 pages fit, 40 images do not
        return db

    monkeypatch.setattr(sqlite3, "connect", small_disk)
    out = tmp_path / "index"
    code, _, err = run_cli(
        capsys, "index", "build", "--ckpt", str(ckpt), "--data", str(pairs), "--out", str(out)
    )
    assert_one_line_error(code, err, str(out), "disk is full", "free some space")
    assert os.listdir(tmp_path) == []  # no temporary directory left


@pytest.mark.parametrize(
    "error",
    [RuntimeError(TORCH_FULL_DISK), OSError(errno.ENOSPC, "No space left on device")],
    ids=["torch-unexpected-pos", "enospc"],
)
def test_full_disk_at_checkpoint_save_is_one_line(capsys, monkeypatch, tmp_path, pairs, error):
    """torch.save on a full disk raises `unexpected pos` (seen on a full tmpfs) or ENOSPC."""

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", "clip-tiny", "--data", str(pairs), "--out", str(out), *TINY_SETS
    )
    assert_one_line_error(code, err, str(out / "state.pt"), "disk is full", "free some space")
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# ------------------------------------------------------------------ values checked up front


@pytest.mark.parametrize(
    ("override", "needle"),
    [("train.batch_size=0", "train.batch_size=0: must be > 0"), ("train.steps=-5", "> 0")],
)
def test_out_of_range_set_fails_before_training(capsys, tmp_path, pairs, override, needle):
    """Before: batch_size=0 was a ZeroDivisionError traceback, steps=-5 exited 0 ('trained -5
    steps ... final loss nan')."""
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", "clip-tiny", "--data", str(pairs), "--out", str(out), "--set", override
    )
    assert_one_line_error(code, err, override.split("=")[0], needle)
    assert not out.exists()


def test_eval_splits_typo_fails_before_training(capsys, tmp_path, pairs):
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", "clip-tiny", "--data", str(pairs), "--out", str(out),
        "--eval-splits", "test,tset", *TINY_SETS,
    )  # fmt: skip
    assert_one_line_error(code, err, "--eval-splits", "'tset'", "test_novel")
    assert not out.exists()  # nothing was trained


def test_world_size_other_than_32_or_64_is_refused(capsys, tmp_path):
    out = tmp_path / "world"
    code, _, err = run_cli(
        capsys, "world", "generate", "--out", str(out), "--n", "20", "--size", "48"
    )
    assert_one_line_error(code, err, "--size 48", "32 or 64")
    assert not out.exists()


# ------------------------------------------------------------------ import-hf on a bad .bin


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hf_bin_dir(tmp_path: Path) -> Path:
    """An HF CLIP directory whose weights are `pytorch_model.bin` (no safetensors)."""
    from transformers import CLIPConfig

    from test_hf import TEXT, VISION

    src = tmp_path / "hf"
    CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24).save_pretrained(src)
    return src


def test_import_hf_reads_a_plain_bin_as_transformers_does(tmp_path):
    import warnings

    from polysense.models.hf import import_hf
    from test_hf import hf_embed, inputs, make_hf

    hf, src = make_hf("clip", tmp_path)
    (src / "model.safetensors").unlink()
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = import_hf(src)
    images, ids = inputs()
    ref_img, ref_txt = hf_embed(hf, images, ids)
    torch.testing.assert_close(model.encode_image(images), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(ids), ref_txt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("content", ["garbage", "empty", "payload"])
def test_import_hf_of_a_bad_bin_is_one_line(capsys, tmp_path, content):
    src = _hf_bin_dir(tmp_path)
    marker = tmp_path / "payload-ran"
    weights = src / "pytorch_model.bin"
    if content == "payload":
        torch.save({"text_model.x": _Payload(marker)}, weights)
    else:
        weights.write_bytes(b"not a pickle at all" if content == "garbage" else b"")
    code, _, err = run_cli(capsys, "import-hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert_one_line_error(code, err, str(weights), "model.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "ckpt").exists()

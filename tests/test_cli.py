"""The command line as a user runs it: a real subprocess, exit codes, stdout/stderr."""

import subprocess
import sys
from pathlib import Path

import pytest

# Seed 000's printed output ("Expected output:"), copied from the tutorial text.
SEED_FUSION = """\
Image features: [0.8 0.7 0.2]
Text features: [0.6 0.2 0.1]
Fused features: [0.8 0.7 0.2 0.6 0.2 0.1]
Fused feature shape: (6,)"""
SEED_MATCHING = """\
Query text: red fruit
red_apple.jpg: 0.9953
orange_ball.jpg: 0.8041
blue_car.jpg: 0.1357
Query text: vehicle
blue_car.jpg: 0.9905
orange_ball.jpg: 0.0744
red_apple.jpg: 0.0110
Query text: round toy
orange_ball.jpg: 0.9958
red_apple.jpg: 0.6785
blue_car.jpg: 0.2150"""
SEED_FILE = next(iter(Path(__file__).parents[2].glob("shared/seeds/000_*.txt")), None)


def polysense(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polysense.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_demo_toy_prints_the_seed_ranking_exactly():
    result = polysense("demo", "toy")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines == (SEED_FUSION + "\n" + SEED_MATCHING).splitlines()


@pytest.mark.skipif(SEED_FILE is None, reason="shared/seeds is not beside this checkout")
def test_expected_blocks_are_the_seed_text():
    seed = SEED_FILE.read_text()
    assert SEED_FUSION in seed
    assert SEED_MATCHING in seed


def test_unknown_preset_is_one_line_error_without_traceback():
    result = polysense("presets", "clip-huge")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown preset 'clip-huge'" in result.stderr and "clip-tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help_with_an_example():
    for args in (
        ["world", "generate"],
        ["data", "inspect"],
        ["demo", "toy"],
        ["tokenizer", "train"],
        ["quickstart"],
        ["presets"],
        ["train"],
        ["eval"],
        ["index", "build"],
        ["index", "add"],
        ["search"],
        ["serve"],
        ["bench", "retrieval"],
        ["import-hf"],
        ["export-hf"],
    ):
        result = polysense(*args, "--help")
        assert result.returncode == 0, (args, result.stderr)
        assert "Example" in result.stdout, args


def test_import_polysense_pulls_no_server_or_plotting_packages():
    code = (
        "import sys, polysense, polysense.cli, polysense.data.tokenizer;"
        "bad = [m for m in ('fastapi', 'uvicorn', 'matplotlib', 'faiss') if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_world_generate_twice_gives_identical_shards(tmp_path):
    for name in ("a", "b"):
        args = ["world", "generate", "--out", str(tmp_path / name), "--n", "120", "--seed", "1"]
        result = polysense(*args, "--modalities", "image,text", "--workers", "1")
        assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(files) == 4  # one shard per split
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_data_inspect_counts_rejects_and_exits_zero(tmp_path):
    from helpers import make_pairs

    path = make_pairs(tmp_path, 6)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with path.open("a") as handle:
        handle.write('{"image": "bad.png", "caption": "a broken image"}\n')
        handle.write('{"image": "0.png", "caption": "   "}\n')
    result = polysense("data", "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "rejected: 2" in result.stdout.splitlines()
    assert "undecodable_image" in result.stdout and "empty_caption" in result.stdout
    assert (tmp_path / "pairs.sheet.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "inspect", "/nonexistent/data.jsonl"], "does not exist"),
        (["train", "clip-huge", "--data", "x", "--out", "y"], "unknown preset 'clip-huge'"),
        (
            ["train", "clip-tiny", "--data", "x", "--out", "y", "--set", "train.lrr=1"],
            "unknown config key",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
    result = polysense(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_train_on_data_without_samples_is_a_one_line_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text('{"image": "missing.png", "caption": "a red circle"}\n')
    result = polysense("train", "clip-tiny", "--data", str(data), "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "no samples with both an image and a caption" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_quickstart_that_hits_its_safety_limit_says_so_and_fails(tmp_path):
    """A quickstart stopped by `--time-limit` (here at once) is never reported as the result:
    the table is marked INCOMPLETE, stderr names the limit and the fix, metrics.json says
    complete=false, and the exit status is 1."""
    from helpers import TINY

    small = [o for o in TINY if not o.startswith(("train.steps", "train.ckpt_every"))]
    sets = [a for o in small for a in ("--set", o)]
    result = polysense(
        "quickstart",
        "--out",
        str(tmp_path / "run"),
        "--world",
        str(tmp_path / "world"),
        "--n",
        "400",
        "--time-limit",
        "1e-9",
        *sets,
    )
    assert result.returncode == 1, result.stderr
    assert "INCOMPLETE" in result.stdout and "Traceback" not in result.stderr
    assert "safety limit" in result.stderr and "--time-limit" in result.stderr
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["train_steps"] == 0

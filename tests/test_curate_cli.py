"""`polysense data ...` curation commands and `bench curation` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from PIL import Image

from helpers import make_pairs


def polysense(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polysense.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_every_curation_command_has_help_with_an_example():
    from typer.testing import CliRunner

    from polysense.cli import app

    runner = CliRunner()
    commands = ["dedup", "filter", "safety", "recaption", "contamination", "shard"]
    for args in [["data", c] for c in [*commands, "curate", "noisy", "verify"]] + [
        ["bench", "curation"]
    ]:
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Example" in result.output, args


def test_config_file_run_then_verify(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", 40)
    lines = pairs.read_text().splitlines()
    # two exact copies of the first sample (files of their own: rows naming one file would
    # merge into one item), one caption with a blocklisted word
    first = json.loads(lines[0])
    for i in range(2):
        shutil.copyfile(pairs.parent / first["image"], pairs.parent / f"copy{i}.png")
    extra = [dict(first, key=f"copy{i}", image=f"copy{i}.png") for i in range(2)]
    Image.new("RGB", (32, 32), (20, 20, 20)).save(pairs.parent / "dark.png")
    extra.append({"key": "bad", "image": "dark.png", "caption": "a nsfw dark square"})
    pairs.write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    config = tmp_path / "curate.py"
    config.write_text(
        "from polysense.data.curate import CurateConfig, ShardConfig\n"
        f"config = CurateConfig(source={str(pairs)!r}, out={str(tmp_path / 'out')!r},\n"
        "    stages=('dedup', 'safety', 'shard'), shard_size=16,\n"
        "    shard=ShardConfig(shard_size=10))\n"
    )
    result = polysense("data", "curate", "--config", str(config), "--set", "shard.seed=3")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"] == 43
    assert report["stages"]["dedup"]["dropped"] == {"exact": 2}
    assert report["stages"]["safety"]["dropped"] == {"blocklist": 1}
    assert report["output"] == 40 and report["config"]["shard"]["seed"] == 3
    result = polysense("data", "verify", str(tmp_path / "out"))
    assert result.returncode == 0 and "checksums ok" in result.stdout


def test_missing_eval_source_is_a_one_line_error(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", 8)
    result = polysense("data", "contamination", str(pairs), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "contamination.eval_source" in result.stderr and "Traceback" not in result.stderr


def test_filter_without_checkpoint_names_the_fix(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", 8)
    result = polysense(
        "data",
        "filter",
        str(pairs),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "filter.min_similarity=0.5",
    )
    assert result.returncode == 2
    assert "set ckpt" in result.stderr and "Traceback" not in result.stderr

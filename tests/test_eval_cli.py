"""The command line on an imported Hugging Face CLIP (random weights, a real-format BPE
tokenizer): `import-hf`, then `eval zeroshot` with --classnames/--templates, `index build` and
`search`, each checked against transformers' own processor + model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor

from test_hf_tokenizers import clip_tok_dir, hf_model_dir  # noqa: F401 (a fixture)

CLASSES = ["red thing", "green thing", "blue thing"]
TEMPLATES = ["a photo of a {c}.", "a {} in a picture"]
COLOURS = {"red_thing": (200, 30, 30), "green_thing": (30, 180, 40), "blue_thing": (30, 40, 200)}


def polysense(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "polysense.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def imported(tmp_path_factory, clip_tok_dir):  # noqa: F811
    """An HF CLIP directory (with a CLIPImageProcessor at its 32 px) and its import."""
    root = tmp_path_factory.mktemp("hf-eval")
    hf, tok, directory = hf_model_dir("clip", root, clip_tok_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    processor.save_pretrained(directory)
    polysense("import-hf", str(directory), "--out", str(root / "ck"))
    # inference in fp32, as transformers runs here ("auto" is bf16 on a CPU with bf16 units,
    # which agrees with fp32 to ~1e-2 only)
    config = json.loads((root / "ck" / "config.json").read_text())
    config["train"]["precision"] = "fp32"
    (root / "ck" / "config.json").write_text(json.dumps(config))
    return hf, tok, processor, root


def images(root: Path) -> dict[Path, str]:
    """An image folder of the three classes: 3 pictures each, of odd sizes, with noise."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for folder, colour in COLOURS.items():
        for i in range(3):
            size = (40 + 7 * i, 33 + 5 * i)
            base = torch.tensor(colour).view(3, 1, 1).expand(3, size[1], size[0])
            noisy = (base + 60 * torch.randn(3, size[1], size[0], generator=g)).clamp(0, 255)
            path = root / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.permute(1, 2, 0).byte().numpy()).save(path)
            out[path] = folder
    return out


def hf_images(hf, processor, paths) -> torch.Tensor:
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixels["pixel_values"])
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def hf_texts(hf, tok, texts) -> torch.Tensor:
    batch = tok(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = hf.get_text_features(**batch)
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def test_eval_zeroshot_runs_on_an_imported_hf_clip(imported, tmp_path):
    hf, tok, processor, root = imported
    truth = images(tmp_path / "data")
    (tmp_path / "c.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    polysense(
        "eval", "zeroshot", "--ckpt", str(root / "ck"), "--data", str(tmp_path / "data"),
        "--classnames", str(tmp_path / "c.txt"), "--templates", str(tmp_path / "t.txt"),
        "--batch-size", "4", "--device", "cpu", "--json", str(tmp_path / "m.json"),
    )  # fmt: skip
    got = json.loads((tmp_path / "m.json").read_text())
    # the expectation, with transformers alone: prompt ensembling as CLIP's notebook does it
    prompts = [t.replace("{c}", "{}").format(c) for c in CLASSES for t in TEMPLATES]
    classes = F.normalize(hf_texts(hf, tok, prompts).view(3, 2, -1).mean(1), dim=-1)  # (3, D)
    paths = sorted(truth)
    predicted = (hf_images(hf, processor, paths) @ classes.T).argmax(1)
    target = torch.tensor([CLASSES.index(truth[p].replace("_", " ")) for p in paths])
    assert got["zeroshot_top1"] == pytest.approx(float((predicted == target).float().mean()))
    assert (got["zeroshot_n_samples"], got["n_samples"]) == (9, 9)


def test_index_build_and_search_run_on_an_imported_hf_clip(imported, tmp_path):
    hf, tok, processor, root = imported
    truth = images(tmp_path / "data")
    table = tmp_path / "data" / "pairs.csv"
    rows = [
        f"{p.relative_to(table.parent).as_posix()},a {c.replace('_', ' ')}"
        for p, c in truth.items()
    ]
    table.write_text("image,caption\n" + "\n".join(rows) + "\n")
    polysense("index", "build", "--ckpt", str(root / "ck"), "--data", str(table), "--out", str(tmp_path / "idx"))  # fmt: skip
    result = polysense("search", "--index", str(tmp_path / "idx"), "a blue thing", "--k", "3", "--json")  # fmt: skip
    hits = json.loads(result.stdout)
    paths = list(truth)
    scores = (hf_texts(hf, tok, ["a blue thing"]) @ hf_images(hf, processor, paths).T)[0]
    want = [
        paths[i].relative_to(table.parent).as_posix() for i in scores.argsort(descending=True)[:3]
    ]
    assert [h["key"] for h in hits] == want  # keys are the image paths the CSV names
    assert [h["image_path"] for h in hits] == want
    assert [h["score"] for h in hits] == pytest.approx(
        scores.sort(descending=True).values[:3].tolist(), abs=1e-4
    )

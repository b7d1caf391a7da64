"""`polysense eval sugarcrepe`: SugarCrepe's {id: {filename, caption, negative_caption}} files.
Accuracies on a fixture with a scorer whose answers are known by hand, the tie rule, and the
command on a CLIP checkpoint and a VLM against scores computed pair by pair through the models'
own API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from polysense.errors import PolysenseError
from polysense.eval.sugarcrepe import (
    evaluate,
    pair_accuracy,
    read_pairs,
    sugarcrepe_files,
    vlm_scorer,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
# replace_att: right, right, wrong (the positive names the wrong colour)
REPLACE_ATT = {
    "0": {"filename": "red.png", "caption": "a red square", "negative_caption": "a blue square"},
    "1": {"filename": "blue.png", "caption": "a blue square", "negative_caption": "a red square"},
    "2": {"filename": "red.png", "caption": "a blue circle", "negative_caption": "a red circle"},
}
# swap_att: a tie (both captions name the image's colour: wrong), then right
SWAP_ATT = {
    "7": {"filename": "blue.png", "caption": "a blue square", "negative_caption": "a blue circle"},
    "9": {"filename": "red.png", "caption": "a red circle", "negative_caption": "a blue circle"},
}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> tuple[Path, Path]:
    """(folder of SugarCrepe files, image root), as the dataset lays them out."""
    root = tmp_path_factory.mktemp("sugarcrepe")
    (root / "data").mkdir()
    (root / "val2017").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 32), rgb).save(root / "val2017" / f"{name}.png")
    (root / "data" / "replace_att.json").write_text(json.dumps(REPLACE_ATT))
    (root / "data" / "swap_att.json").write_text(json.dumps(SWAP_ATT))
    (root / "data" / "notes.json").write_text(json.dumps({"not": "pairs"}))  # not a pairs file
    return root / "data", root / "val2017"


def colour_scorer(images, captions) -> torch.Tensor:
    """1 when the caption names the image's colour (its top-left pixel), else 0."""
    named = {v: k for k, v in COLOURS.items()}
    return torch.tensor(
        [
            float(named[im.getpixel((0, 0))] in c.split())
            for im, c in zip(images, captions, strict=True)
        ]
    )


def test_accuracy_counts_a_tie_as_wrong() -> None:
    pos = torch.tensor([0.3, 0.1, 0.5, 0.2])
    neg = torch.tensor([0.2, 0.4, 0.5, 0.1])
    assert pair_accuracy(pos, neg) == 0.5  # right, wrong, tie, right


def test_accuracies_by_hand(fixture) -> None:
    data, images = fixture
    files = sugarcrepe_files(data)
    assert [f.name for f in files] == ["replace_att.json", "swap_att.json"]
    metrics = evaluate(colour_scorer, files, images, batch_size=2, limit=None)
    assert metrics == {
        "sugarcrepe_accuracy": 3 / 5,
        "sugarcrepe_n": 5,
        "sugarcrepe_replace_att": 2 / 3,
        "sugarcrepe_n_replace_att": 3,
        "sugarcrepe_swap_att": 1 / 2,
        "sugarcrepe_n_swap_att": 2,
    }
    one = evaluate(colour_scorer, [files[0]], images, batch_size=8, limit=2)
    assert one["sugarcrepe_accuracy"] == 1.0 and one["sugarcrepe_n"] == 2  # the first two


def test_bad_files_are_one_line_errors(fixture, tmp_path) -> None:
    _, images = fixture
    bad = tmp_path / "replace_obj.json"
    bad.write_text(json.dumps({"3": {"filename": "red.png", "caption": "a red square"}}))
    assert sugarcrepe_files(bad) == []
    with pytest.raises(PolysenseError, match=r"entry '3' has no 'negative_caption' field"):
        read_pairs(bad)
    with pytest.raises(
        PolysenseError, match=r"replace_obj\.json: entry '3': image .*nope\.png does not exist"
    ):
        bad.write_text(json.dumps({"3": {**REPLACE_ATT["0"], "filename": "nope.png"}}))
        evaluate(colour_scorer, [bad], images, batch_size=2, limit=None)


def test_cli_on_a_clip_equals_cosines_pair_by_pair(fixture, tmp_path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import polysense
    from helpers import tiny_config
    from polysense.models.checkpoint import save_checkpoint
    from polysense.models.clip import build_model
    from test_cli_errors import run_cli

    cfg = tiny_config("clip-tiny")
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(cfg), cfg, tmp_path / "clip")
    data, images = fixture
    out = tmp_path / "m.json"
    args = ["eval", "sugarcrepe", "--ckpt", str(ckpt), "--data", str(data)]
    code, _, err = run_cli(capsys, *args, "--image-root", str(images), "--json", str(out))
    assert code == 0, err
    metrics = json.loads(out.read_text())
    model = polysense.load(str(ckpt))
    right = {}
    with torch.no_grad():
        for name, pairs in (("replace_att", REPLACE_ATT), ("swap_att", SWAP_ATT)):
            hits = []
            for p in pairs.values():
                img = model.encode_image([Image.open(images / p["filename"]).convert("RGB")])
                txt = model.encode_text([p["caption"], p["negative_caption"]])
                cos = (img @ txt.T)[0]  # (2,)
                hits.append(bool(cos[0] > cos[1]))
            right[name] = hits
    assert metrics["sugarcrepe_replace_att"] == pytest.approx(sum(right["replace_att"]) / 3)
    assert metrics["sugarcrepe_swap_att"] == pytest.approx(sum(right["swap_att"]) / 2)
    every = right["replace_att"] + right["swap_att"]
    assert metrics["sugarcrepe_accuracy"] == pytest.approx(sum(every) / 5)
    assert metrics["n_samples"] == 5 and metrics["chance"] == 0.5


def test_vlm_scores_are_caption_log_likelihoods(fixture) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from polysense.data.chat import CAPTION_INSTRUCTION, ChatTokenizer, chat_prompt
    from test_vlm import _tiny_vlm

    texts = [p[k] for p in (*REPLACE_ATT.values(), *SWAP_ATT.values()) for k in ("caption",)]
    model = _tiny_vlm(ChatTokenizer.train([*texts, "a red blue circle square"], vocab_size=300))
    data, images = fixture
    files = sugarcrepe_files(data)
    metrics = evaluate(vlm_scorer(model), files, images, batch_size=2, limit=None)
    hits = []
    with torch.no_grad():
        for p in (*REPLACE_ATT.values(), *SWAP_ATT.values()):
            image = Image.open(images / p["filename"]).convert("RGB")
            prompt = chat_prompt(CAPTION_INSTRUCTION)
            s = [
                model.score([image], [prompt], [c])[0]
                for c in (p["caption"], p["negative_caption"])
            ]
            hits.append(bool(s[0] > s[1]))
    assert metrics["sugarcrepe_replace_att"] == pytest.approx(sum(hits[:3]) / 3)
    assert metrics["sugarcrepe_swap_att"] == pytest.approx(sum(hits[3:]) / 2)

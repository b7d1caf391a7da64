"""Evaluation on real formats: Karpathy split JSON and merged CSV rows give hand-computed
Recall@K, shared captions warn, zero-shot reads class names and templates from files and folder
names with `_` as spaces, and the linear probe equals scikit-learn fitted by hand."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polysense.data.readers import detect_format, read_samples
from polysense.errors import DataError
from polysense.eval.linear_probe import C_GRID, choose_c, linear_probe_eval
from polysense.eval.retrieval import SharedCaptionWarning, retrieval_eval
from polysense.eval.suite import evaluate
from polysense.eval.templates import OPENAI, load_classnames, load_templates
from polysense.eval.zeroshot import zeroshot_eval


def unit(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


class TableModel:
    """A stand-in dual encoder with hand-set embeddings: an image is looked up by its red
    value, a text by its string (or by the first word it contains)."""

    def __init__(self, images: dict[int, torch.Tensor], texts: dict[str, torch.Tensor]) -> None:
        self.images, self.texts = images, texts

    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.images[im.getpixel((0, 0))[0]] for im in images])

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        def lookup(text: str) -> torch.Tensor:
            if text in self.texts:
                return self.texts[text]
            return next((v for k, v in self.texts.items() if k in text), self.texts["*"])

        return torch.stack([lookup(t) for t in texts])


def png(path: Path, red: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (red, 0, 0)).save(path)


# Three test images at 0, 90 and 180 degrees, two captions each (angles in degrees):
IMAGES = {"i0.jpg": 0, "i1.jpg": 90, "i2.jpg": 180}
CAPTIONS = {"i0.jpg": {"a0": 20, "b0": 100}, "i1.jpg": {"a1": 70, "b1": 200}, "i2.jpg": {"a2": 170, "b2": 45}}  # fmt: skip
# By hand, from the angular distances (a smaller distance is a higher cosine):
#   image -> text: i0's nearest caption is its own a0 (20); i1's nearest is b0 (10), then its
#   own a1 (20): rank 1; i2's nearest is its own a2 (10). R@1 = 2/3, R@2 = 1.
#   text -> image: a0 -> i0 first; b0 (100) is nearer i1 (10) and i2 (80) than i0: rank 2;
#   a1 -> i1 first; b1 (200) is nearer i2 (20) than i1 (110): rank 1; a2 -> i2 first;
#   b2 (45) is nearer i0 and i1 (45 each) than i2 (135): rank 2.
#   R@1 = 3/6, R@2 = 4/6 (a0, a1, a2, b1).
EXPECTED = {"i2t_r1": 2 / 3, "i2t_r2": 1.0, "t2i_r1": 3 / 6, "t2i_r2": 4 / 6}


def model() -> TableModel:
    images = {10 * (i + 1): unit(a) for i, a in enumerate(IMAGES.values())}
    images[99] = unit(30)  # the train image
    texts = {t: unit(a) for caps in CAPTIONS.values() for t, a in caps.items()}
    texts["t0"] = unit(95)
    return TableModel(images, texts)


def write_karpathy(root: Path, *, coco: bool) -> Path:
    """A Karpathy split file: COCO style (files under filepath/) or Flickr30k style."""
    entries = []
    for i, name in enumerate(IMAGES):
        folder = "val2014" if coco else ""
        png(root / "images" / folder / name, 10 * (i + 1))
        sentences = [{"raw": c, "tokens": [c], "imgid": i} for c in CAPTIONS[name]]
        entries.append({"filename": name, "split": "test", "sentences": sentences, "imgid": i})
        if coco:
            entries[-1] |= {"filepath": folder, "cocoid": 1000 + i}
    png(root / "images" / "train.jpg", 99)  # a train image that would change every rank
    train = [{"raw": "t0", "tokens": ["t0"]}]
    entries.append({"filename": "train.jpg", "split": "train", "sentences": train, "imgid": 3})
    path = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "flickr30k"}))
    return path


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_json_gives_the_hand_computed_recall(tmp_path, coco):
    path = write_karpathy(tmp_path / "k", coco=coco)
    assert detect_format(path) == "karpathy"
    samples = list(read_samples(path, split="test", image_root=tmp_path / "k" / "images"))
    assert [s["text"] for s in samples] == [list(c) for c in CAPTIONS.values()]
    assert [s["key"] for s in samples] == [("val2014/" if coco else "") + n for n in IMAGES]
    got = retrieval_eval(model(), samples, ks=(1, 2))
    assert {k: got[k] for k in EXPECTED} == pytest.approx(EXPECTED, abs=0)
    assert (got["n_samples"], got["n_captions"], got["n_shared_captions"]) == (3, 6, 0)
    assert len(list(read_samples(path, image_root=tmp_path / "k" / "images"))) == 4  # all splits
    with pytest.raises(
        DataError, match=r"no image has split 'testing'; splits: \['test', 'train'\]"
    ):
        list(read_samples(path, split="testing"))


def test_csv_rows_of_one_image_give_the_same_recall_as_karpathy(tmp_path):
    """Six caption rows, two per image, shuffled: merged by image, Recall@K is the hand-computed
    one; one item per row would count the same image three times over."""
    for i, name in enumerate(IMAGES):
        png(tmp_path / name, 10 * (i + 1))
    rows = [(name, cap) for name in IMAGES for cap in CAPTIONS[name]]
    order = [3, 0, 5, 1, 4, 2]
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n" + "".join(f"{rows[i][0]},{rows[i][1]}\n" for i in order))
    got = evaluate(model(), table, split=None, tasks=("retrieval",))
    # CLIP_benchmark's K are 1, 5, 10: with 3 images every R@5 is 1
    assert (got["i2t_r1"], got["t2i_r1"]) == (EXPECTED["i2t_r1"], EXPECTED["t2i_r1"])
    assert (got["retrieval_n_samples"], got["retrieval_n_captions"]) == (3, 6)


def test_a_caption_shared_by_two_images_warns_and_explains_the_tie(tmp_path):
    for i, name in enumerate(IMAGES):
        png(tmp_path / name, 10 * (i + 1))
    table = tmp_path / "c.csv"
    table.write_text("image,caption\ni0.jpg,a0\ni1.jpg,a0\ni2.jpg,a2\n")
    with pytest.warns(
        SharedCaptionWarning, match=r"1 caption texts belong to more than one image \(e\.g\. 'a0'\)"
    ):
        got = evaluate(model(), table, split=None, tasks=("retrieval",))
    # i0 and i1 each tie with the other's identical 'a0': both miss at K=1, i2 does not
    assert got["i2t_r1"] == 1 / 3 and got["retrieval_n_shared_captions"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unique captions: no warning
        table.write_text("image,caption\ni0.jpg,a0\ni1.jpg,a1\ni2.jpg,a2\n")
        evaluate(model(), table, split=None, tasks=("retrieval",))


def test_folder_names_with_underscores_are_class_names_with_spaces(tmp_path):
    """Prompts say 'hot dog', which the text table knows; 'hot_dog' would hit the '*' row,
    scoring 0 against both images (a tie, counted as a miss)."""
    png(tmp_path / "hot_dog" / "1.png", 10)
    png(tmp_path / "hot_dog" / "2.png", 10)
    png(tmp_path / "cat" / "1.png", 20)
    m = TableModel(
        {10: torch.tensor([1.0, 0, 0]), 20: torch.tensor([0, 1.0, 0])},
        {"hot dog": torch.tensor([1.0, 0, 0]), "cat": torch.tensor([0, 1.0, 0]), "*": torch.tensor([0, 0, 1.0])},
    )  # fmt: skip
    got = evaluate(m, tmp_path, split=None, tasks=("zeroshot",), templates=("a photo of a {}.",))
    assert got["zeroshot_top1"] == 1.0 and got["zeroshot_n_samples"] == 3
    assert got["zeroshot_per_class"] == {"cat": 1.0, "hot dog": 1.0}


def test_class_names_and_templates_from_files(tmp_path):
    (tmp_path / "c.txt").write_text("zero\none\n\n")
    (tmp_path / "t.txt").write_text("a photo of the number {c}.\n{} written by hand\n")
    assert load_classnames(tmp_path / "c.txt") == ["zero", "one"]
    assert load_templates(tmp_path / "t.txt") == ("a photo of the number {}.", "{} written by hand")
    assert load_templates("openai") == OPENAI and len(OPENAI) == 80 == len(set(OPENAI))
    (tmp_path / "bad.txt").write_text("fine {}\nno slot here\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: 'no slot here' must hold"):
        load_templates(tmp_path / "bad.txt")
    with pytest.raises(DataError, match=r"no template set of that name.*openai, simple, world"):
        load_templates("imagenet")
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"dup\.txt, line 3: 'cat' is line 1 too"):
        load_classnames(tmp_path / "dup.txt")
    # a CSV label cell of digits is a class index when it names no class
    png(tmp_path / "a.png", 10)
    png(tmp_path / "b.png", 20)
    (tmp_path / "d.csv").write_text("image,caption,label\na.png,x,0\nb.png,y,1\n")
    m = TableModel(
        {10: torch.tensor([1.0, 0]), 20: torch.tensor([0, 1.0])},
        {"zero": torch.tensor([1.0, 0]), "one": torch.tensor([0, 1.0]), "*": torch.tensor([1.0, 1.0])},
    )  # fmt: skip
    got = zeroshot_eval(m, read_samples(tmp_path / "d.csv"), classnames=["zero", "one"])
    assert got["zeroshot_top1"] == 1.0 and got["n_samples"] == 2


def probe_data(
    n_per_class: int, seed: int
) -> tuple[dict[int, torch.Tensor], list[tuple[int, int]]]:
    """Image embeddings around 3 class centres in 8-D (noise 0.8: classes overlap)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=g)
    table, items = {}, []
    for i in range(3 * n_per_class):
        label = i % 3
        table[i] = F.normalize(centres[label] + 0.8 * torch.randn(8, generator=g), dim=0)
        items.append((i, label))
    return table, items


def write_folder(root: Path, items: list[tuple[int, int]], offset: int) -> None:
    for i, label in items:
        png(root / ["ant", "bee", "cow"][label] / f"{i}.png", offset + i)


def test_linear_probe_equals_scikit_learn_on_the_same_features(tmp_path):
    from sklearn.linear_model import LogisticRegression

    train_table, train_items = probe_data(20, seed=0)  # 60 train images, red 0..59
    test_table, test_items = probe_data(30, seed=1)  # 90 test images, red 100..189
    test_table = {100 + i: v for i, v in test_table.items()}
    write_folder(tmp_path / "train", train_items, 0)
    write_folder(tmp_path / "test", test_items, 100)
    m = TableModel({**train_table, **test_table}, {})
    got = linear_probe_eval(
        m, read_samples(tmp_path / "train"), read_samples(tmp_path / "test"),
        classnames=["ant", "bee", "cow"], c=0.5,
    )  # fmt: skip
    x = torch.stack([train_table[i] for i, _ in train_items]).double().numpy()
    y = np.array([label for _, label in train_items])
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(x, y)
    x_test = torch.stack([test_table[100 + i] for i, _ in test_items]).double().numpy()
    y_test = np.array([label for _, label in test_items])
    want = float((reference.predict(x_test) == y_test).mean())
    assert 0 < want < 1  # the classes overlap, so the figure can tell probes apart
    assert got["linear_probe_top1"] == pytest.approx(want, abs=1e-12)
    assert (got["n_train"], got["n_samples"], got["linear_probe_c"]) == (60, 90, 0.5)
    assert got["linear_probe_top5"] == 1.0  # 3 classes


def test_choosing_c_picks_the_best_held_out_accuracy():
    from sklearn.linear_model import LogisticRegression

    table, items = probe_data(30, seed=2)
    x = torch.stack([table[i] for i, _ in items]).double().numpy()
    y = np.array([label for _, label in items])
    chosen, held_out = choose_c(x, y, seed=3)
    order = np.random.default_rng(3).permutation(len(y))
    val, fit = order[: len(y) // 5], order[len(y) // 5 :]
    naive = {}
    for c in C_GRID:
        predicted = LogisticRegression(C=c, max_iter=1000).fit(x[fit], y[fit]).predict(x[val])
        naive[c] = float((predicted == y[val]).mean())
    assert held_out == pytest.approx(naive, abs=1e-12)
    assert chosen == min(c for c in C_GRID if naive[c] == max(naive.values()))

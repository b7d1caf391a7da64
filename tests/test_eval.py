"""Zero-shot and retrieval evaluation against hand-computed values and naive references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polysense.errors import PolysenseError
from polysense.eval.retrieval import retrieval_eval, retrieval_metrics
from polysense.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    accuracy_topk,
    zeroshot_classifier,
    zeroshot_eval,
)

# ---------------------------------------------------------------- helpers


def vec_image(values) -> Image.Image:
    """A 1-row float ("F" mode) PIL image whose pixels are the embedding the fake model returns."""
    return Image.fromarray(np.asarray([values], dtype=np.float32))


class FakeModel(torch.nn.Module):
    """Duck-typed CLIP: images are their own pixels, texts map through `text_fn`."""

    def __init__(self, *, text_fn, normalise_text=True):
        super().__init__()
        self.text_fn = text_fn
        self.normalise_text = normalise_text
        self.text_batches: list[int] = []
        self.image_batches: list[int] = []
        self.calls_in_inference_mode: list[bool] = []
        self.calls_in_train_mode: list[bool] = []

    def _record(self) -> None:
        self.calls_in_inference_mode.append(torch.is_inference_mode_enabled())
        self.calls_in_train_mode.append(self.training)

    def encode_image(self, images):
        self._record()
        assert isinstance(images, list)
        self.image_batches.append(len(images))
        x = torch.stack([torch.tensor(np.asarray(im, dtype=np.float32)[0]) for im in images])
        return F.normalize(x, dim=-1)

    def encode_text(self, texts):
        self._record()
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        self.text_batches.append(len(texts))
        emb = torch.stack([self.text_fn(t) for t in texts]).float()
        return F.normalize(emb, dim=-1) if self.normalise_text else emb


def naive_recall(image_emb, text_emb, text_to_image, ks):
    """Python loops: sort candidates by score (ties: wrong candidates first), find first hit."""
    img = image_emb.double().tolist()
    txt = text_emb.double().tolist()
    owner = text_to_image.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def first_hit(scored):  # scored: list of (score, is_correct)
        order = sorted(scored, key=lambda s: (-s[0], s[1]))  # False < True: misses first on ties
        return next(pos for pos, (_, ok) in enumerate(order) if ok)

    i2t = [
        first_hit([(dot(q, t), owner[m] == i) for m, t in enumerate(txt)])
        for i, q in enumerate(img)
    ]
    t2i = [
        first_hit([(dot(q, v), i == owner[m]) for i, v in enumerate(img)])
        for m, q in enumerate(txt)
    ]
    out = {f"i2t_r{k}": sum(r < k for r in i2t) / len(i2t) for k in ks}
    out |= {f"t2i_r{k}": sum(r < k for r in t2i) / len(t2i) for k in ks}
    return out


def clip_benchmark_recall(image_emb, text_emb, text_to_image, ks):
    """CLIP_benchmark's formulation: top-k indices, then 'any positive among them'."""
    scores = text_emb @ image_emb.T  # (M, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_to_image)), text_to_image] = True
    out = {}
    for k in ks:
        top_i = scores.T.topk(min(k, scores.shape[0]), dim=1).indices  # (N, k) texts per image
        out[f"i2t_r{k}"] = positive.T.gather(1, top_i).any(1).double().mean().item()
    for k in ks:
        top_t = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (M, k) images per text
        out[f"t2i_r{k}"] = positive.gather(1, top_t).any(1).double().mean().item()
    return out


def random_retrieval_set(seed, n_images=23, dim=8, max_caps=4):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_caps + 1, (n_images,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_images), counts)
    owner = owner[torch.randperm(len(owner), generator=g)]  # captions not grouped by image
    image_emb = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    # captions: noisy copies of their image, so recalls are neither 0 nor 1
    text_emb = F.normalize(
        image_emb[owner] + 0.9 * torch.randn(len(owner), dim, generator=g), dim=-1
    )
    return image_emb, text_emb, owner


def assert_metrics_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


# ---------------------------------------------------------------- retrieval metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_reference_and_clip_benchmark(seed):
    image_emb, text_emb, owner = random_retrieval_set(seed)
    ks = (1, 5, 10)
    got = retrieval_metrics(image_emb, text_emb, owner, ks, block_size=4)
    assert_metrics_equal(got, naive_recall(image_emb, text_emb, owner, ks))
    assert_metrics_equal(got, clip_benchmark_recall(image_emb, text_emb, owner, ks))
    assert 0.0 < got["i2t_r1"] < 1.0 and 0.0 < got["t2i_r1"] < 1.0  # a non-trivial case
    assert got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"]


def test_retrieval_hand_computed_ranks():
    # Score matrix S (3 images x 5 captions); captions 0,1 -> image 0, 2,3 -> image 1, 4 -> image 2.
    # With image_emb = I, text_emb = S.T, image i . caption m = S[i, m] exactly.
    S = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.4, 0.5],
            [0.2, 0.7, 0.6, 0.4, 0.95],
            [0.3, 0.5, 0.1, 0.2, 0.0],
        ]
    )
    owner = torch.tensor([0, 0, 1, 1, 2])
    got = retrieval_metrics(torch.eye(3), S.T.contiguous(), owner, ks=(1, 2, 3))
    # i2t: image 0 best caption 0.9 is top -> rank 0; image 1 best own 0.6, beaten by 0.7 and
    # 0.95 -> rank 2; image 2 own 0.0, beaten by all 4 -> rank 4.  Ranks [0, 2, 4].
    # t2i: cap0 [.9,.2,.3] rank 0; cap1 [.1,.7,.5] rank 2; cap2 [.8,.6,.1] rank 1;
    # cap3 [.4,.4,.2] ties image 0 -> rank 1 (ties count against the query); cap4 [.5,.95,0] rank 2.
    expected = {
        "i2t_r1": 1 / 3,
        "i2t_r2": 1 / 3,
        "i2t_r3": 2 / 3,
        "t2i_r1": 1 / 5,
        "t2i_r2": 3 / 5,
        "t2i_r3": 5 / 5,
    }
    assert_metrics_equal(got, expected)


def test_ties_count_against_the_query():
    # Integer embeddings: dot products are exact, so ties are real ties.
    g = torch.Generator().manual_seed(3)
    image_emb = torch.randint(-1, 2, (15, 2), generator=g).float()
    owner = torch.randint(0, 15, (40,), generator=g)
    owner[:15] = torch.arange(15)  # every image has a caption
    text_emb = torch.randint(-1, 2, (40, 2), generator=g).float()
    ks = (1, 3, 10)
    got = retrieval_metrics(image_emb, text_emb, owner, ks, block_size=6)
    assert_metrics_equal(got, naive_recall(image_emb, text_emb, owner, ks))
    # A collapsed model: every score equal, so no query can claim rank 0.
    same = torch.ones(15, 4)
    collapsed = retrieval_metrics(same, torch.ones(40, 4), owner, ks=(1,))
    assert collapsed == {"i2t_r1": 0.0, "t2i_r1": 0.0}


def test_block_size_does_not_change_results():
    image_emb, text_emb, owner = random_retrieval_set(4, n_images=31)
    ref = retrieval_metrics(image_emb, text_emb, owner, block_size=10_000)
    for block in (1, 2, 7, 30, 31, 32):
        assert retrieval_metrics(image_emb, text_emb, owner, block_size=block) == ref


def test_perfect_embeddings_give_one():
    torch.manual_seed(0)
    image_emb = F.normalize(torch.randn(20, 16), dim=-1)
    owner = torch.arange(20).repeat(3)  # 3 identical captions per image
    got = retrieval_metrics(image_emb, image_emb[owner].clone(), owner)
    assert got == {k: 1.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}


def test_retrieval_metrics_rejects_bad_input():
    emb = torch.eye(3)
    with pytest.raises(PolysenseError, match="no caption"):
        retrieval_metrics(emb, emb, torch.tensor([0, 0, 1]))
    with pytest.raises(PolysenseError, match="same D"):
        retrieval_metrics(emb, torch.ones(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(PolysenseError, match="outside"):
        retrieval_metrics(emb, emb, torch.tensor([0, 1, 3]))
    with pytest.raises(PolysenseError, match="integer tensor"):
        retrieval_metrics(emb, emb, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(PolysenseError, match="at least one"):
        retrieval_metrics(torch.ones(0, 3), torch.ones(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(PolysenseError, match="NaN"):
        retrieval_metrics(emb * float("nan"), emb, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- retrieval_eval


def test_retrieval_eval_embeds_images_and_all_captions():
    torch.manual_seed(0)
    dim, n = 6, 11
    image_vecs = torch.randn(n, dim)
    captions = [[f"img{i} cap{j}" for j in range(1 + i % 3)] for i in range(n)]
    text_vecs = {c: torch.randn(dim) for caps in captions for c in caps}
    samples = [
        {
            "key": f"s{i}",
            "image": vec_image(image_vecs[i].tolist()),
            "text": captions[i],
            "label": None,
        }
        for i in range(n)
    ]
    bad = [
        {"key": "no-image", "text": ["x"]},
        {"key": "no-text", "image": vec_image([1.0] * dim), "text": []},
        {"key": "blank", "image": vec_image([1.0] * dim), "text": ["  "]},
    ]
    model = FakeModel(text_fn=lambda t: text_vecs[t])
    model.train()
    got = retrieval_eval(model, iter(samples[:5] + bad + samples[5:]), batch_size=4)

    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    image_emb = F.normalize(image_vecs, dim=-1)
    text_emb = F.normalize(torch.stack([text_vecs[t] for t in texts]), dim=-1)
    expected = naive_recall(image_emb, text_emb, owner, (1, 5, 10))
    assert_metrics_equal({k: got[k] for k in expected}, expected)
    assert (got["n_samples"], got["n_captions"], got["n_skipped"]) == (n, len(texts), 3)
    assert max(model.image_batches) <= 4 and max(model.text_batches) <= 4
    assert sum(model.image_batches) == n and sum(model.text_batches) == len(texts)
    assert all(model.calls_in_inference_mode) and not any(model.calls_in_train_mode)
    assert model.training  # mode restored

    # max_captions keeps the first caption of each image only
    one = retrieval_eval(FakeModel(text_fn=lambda t: text_vecs[t]), samples, max_captions=1)
    firsts = torch.stack([text_vecs[caps[0]] for caps in captions])
    expected_one = naive_recall(image_emb, F.normalize(firsts, dim=-1), torch.arange(n), (1, 5, 10))
    assert_metrics_equal({k: one[k] for k in expected_one}, expected_one)
    assert one["n_captions"] == n


def test_retrieval_eval_empty_input_raises():
    model = FakeModel(text_fn=lambda t: torch.ones(3))
    with pytest.raises(PolysenseError, match="no sample with an image and a caption"):
        retrieval_eval(model, [])
    with pytest.raises(PolysenseError, match="1 skipped"):
        retrieval_eval(model, [{"key": "a", "text": ["only text"]}])


# ---------------------------------------------------------------- zero-shot


def test_accuracy_topk_hand_computed():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # target 0: rank 0
            [0.9, 0.5, 0.1],  # target 1: rank 1
            [0.2, 0.9, 0.1],  # target 2: rank 2
            [0.5, 0.5, 0.0],  # target 0: tied with class 1 -> rank 1 (ties count as misses)
        ]
    )
    targets = torch.tensor([0, 1, 2, 0])
    got = accuracy_topk(logits, targets, ks=(1, 2, 5))
    assert got == pytest.approx({1: 1 / 4, 2: 3 / 4, 5: 1.0})
    with pytest.raises(PolysenseError, match="NaN"):
        accuracy_topk(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


CLASSES = [
    "red circle",
    "blue square",
    "green triangle",
    "yellow star",
    "purple circle",
    "orange square",
]


def class_text_fn(text: str) -> torch.Tensor:
    """Every prompt of class c embeds to the basis vector e_c, whatever the template."""
    hits = [i for i, c in enumerate(CLASSES) if c in text]
    assert len(hits) == 1, text
    return torch.eye(len(CLASSES))[hits[0]]


def test_zeroshot_eval_hand_computed():
    # Class embeddings are e_0..e_5, so an image's class scores are its own normalised pixels.
    down = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # class order 0,1,2,3,4,5
    samples = [
        {"key": "a", "image": vec_image(down), "label": "red circle"},  # rank 0: top1, top5
        {"key": "b", "image": vec_image(down), "label": "blue square"},  # rank 1: top5 only
        {"key": "c", "image": vec_image(down), "label": "orange square"},  # rank 5: neither
        {"key": "d", "image": vec_image([0, 1, 2, 3, 5, 4]), "label": "purple circle"},  # rank 0
        {"key": "e", "image": vec_image(down), "label": "pink hexagon"},  # not a class: ignored
        {"key": "f", "image": vec_image(down), "label": None},  # unlabelled: ignored
        {"key": "g", "label": "red circle"},  # no image: ignored
        {
            "key": "h",
            "image": vec_image([0, 1, 0, 0, 0, 0]),
            "label": 1,
        },  # int = class index, rank 0
    ]
    model = FakeModel(text_fn=class_text_fn)
    got = zeroshot_eval(model, iter(samples), classnames=CLASSES, batch_size=2)
    assert got["n_samples"] == 5 and got["n_ignored"] == 3
    assert got["zeroshot_top1"] == pytest.approx(3 / 5)
    assert got["zeroshot_top5"] == pytest.approx(4 / 5)
    assert got["per_class"] == pytest.approx(
        {"red circle": 1.0, "blue square": 0.5, "purple circle": 1.0, "orange square": 0.0}
    )
    assert max(model.image_batches) <= 2 and max(model.text_batches) <= 2
    assert sum(model.text_batches) == len(CLASSES) * len(DEFAULT_TEMPLATES)
    assert all(model.calls_in_inference_mode)
    # batch size does not change the result
    again = zeroshot_eval(FakeModel(text_fn=class_text_fn), samples, classnames=CLASSES)
    assert again == got


def test_template_averaging_is_mean_then_normalise():
    # The fake text tower returns raw (unnormalised) vectors here, so per-prompt normalisation
    # matters. Hand case: prompts embed to e_0 and 3 e_1 -> unit e_0, e_1 -> (1, 1, 0) / sqrt(2)
    # (without per-prompt normalisation it would be (1, 3, 0) / sqrt(10)).
    lookup = {"a cat.": [1.0, 0.0, 0.0], "a photo of a cat.": [0.0, 3.0, 0.0]}
    model = FakeModel(text_fn=lambda t: torch.tensor(lookup[t]), normalise_text=False)
    cls = zeroshot_classifier(model, ["cat"], ["a {}.", "a photo of a {}."])
    r = 1 / math.sqrt(2)
    assert torch.allclose(cls, torch.tensor([[r, r, 0.0]]), atol=1e-7)

    # Random case: manual per-prompt normalise, mean over templates, normalise again.
    torch.manual_seed(0)
    names = ["red circle", "blue square", "green star"]
    templates = ["a {}.", "a photo of a {}.", "an image showing a {}."]
    raw = {t.format(c): torch.randn(8) * (1 + i) for i, c in enumerate(names) for t in templates}
    model = FakeModel(text_fn=lambda t: raw[t], normalise_text=False)
    got = zeroshot_classifier(model, names, templates, batch_size=2)
    expected = torch.stack(
        [
            F.normalize(
                torch.stack([F.normalize(raw[t.format(c)], dim=0) for t in templates]).mean(0),
                dim=0,
            )
            for c in names
        ]
    )
    assert got.shape == (3, 8)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_zeroshot_errors_are_clear():
    model = FakeModel(text_fn=class_text_fn)
    with pytest.raises(PolysenseError, match="no samples"):
        zeroshot_eval(model, [], classnames=CLASSES)
    unlabelled = [{"key": "a", "image": vec_image([1.0] * 6), "label": "pink hexagon"}]
    with pytest.raises(PolysenseError, match="'pink hexagon'"):
        zeroshot_eval(model, unlabelled, classnames=CLASSES)
    with pytest.raises(PolysenseError, match="classnames is empty"):
        zeroshot_classifier(model, [], DEFAULT_TEMPLATES)
    with pytest.raises(PolysenseError, match="exactly once"):
        zeroshot_classifier(model, CLASSES, ["a photo"])
    with pytest.raises(PolysenseError, match="duplicates"):
        zeroshot_classifier(model, ["red circle", "red circle"], DEFAULT_TEMPLATES)

import pytest
import torch

from polysense.data.tokenizer import Tokenizer
from polysense.errors import DataError, PolysenseError

CAPTIONS = [
    "a red circle",
    "a small blue square left of a large green triangle",
    "two shapes: a yellow star and a purple circle",
    "an orange triangle above a red square",
] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=300, context_length=12)


def test_bpe_rows_are_bos_text_eot_pad(bpe):
    ids = bpe(["a red circle", "a RED circle"])
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])  # lower-cased
    row = ids[0].tolist()
    n = int(bpe.attention_mask(ids)[0].sum())
    assert row[0] == bpe.bos_id and row[n - 1] == bpe.eot_id
    assert all(t == bpe.pad_id for t in row[n:])
    assert bpe.decode(row) == "a red circle"


def test_truncation_is_explicit(bpe):
    long = " ".join(["red circle"] * 40)
    ids, n_truncated = bpe.encode([long, "a red circle"])
    assert n_truncated == 1
    assert ids[0, -1].item() == bpe.eot_id and (ids[0] != bpe.pad_id).all()
    with pytest.raises(PolysenseError, match="context_length=12"):
        bpe.encode([long], truncate=False)


def test_save_and_reload_gives_same_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path, context_length=12)
    texts = ["a small blue square left of a large green triangle", "unseen wörds ok"]
    assert torch.equal(bpe(texts), again(texts))
    assert again.vocab_size == bpe.vocab_size


def test_minilm_vocabulary_matches_transformers():
    from transformers import AutoTokenizer

    from polysense.data.tokenizer import minilm_dir

    ours = Tokenizer.minilm(context_length=16)
    ref = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    texts = ["A red circle left of a blue square.", "two shapes"]
    expected = ref(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(ours(texts), expected["input_ids"])
    assert torch.equal(ours.attention_mask(ours(texts)), expected["attention_mask"].bool())
    assert ours.vocab_size == 30522


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer"):
        Tokenizer.from_file(bad)

"""Tokenizers of each Hugging Face family, in each family's real file format, give exactly the
ids transformers' own tokenizer gives (padding and truncation included), and an imported HF
CLIP / SigLIP encodes strings exactly as transformers' tokenizer + model do.

Formats: CLIP's byte-level BPE (`CLIPTokenizer` built from a vocabulary and merges learned here,
saved as `tokenizer.json`, `<|startoftext|>` / `<|endoftext|>`, pad = eos), BERT WordPiece (the
real all-MiniLM-L6-v2 files shipped offline), and SigLIP's SentencePiece (`spiece.model` trained
here with sentencepiece; no BOS, eos appended, padded to 64)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    SiglipConfig,
    SiglipModel,
)

from polysense.data.tokenizer import Tokenizer, minilm_dir
from polysense.models.hf import export_hf, import_hf

CORPUS = [
    "a photo of a cat",
    "a photo of a dog on the grass",
    "a red circle left of a blue square",
    "two small green triangles above a large yellow star",
    "the quick brown fox jumps over the lazy dog",
    "an image of a car, a bus and a bicycle",
] * 20
BATTERY = [
    "a photo of a cat",
    "A PHOTO OF A CAT!!!",
    "Ünïcödé café — naïve 東京 🚀",
    "punctuation: (a), [b]; {c}... 'quoted' \"double\" a-b_c",
    "   extra   spaces\tand\nnewlines  ",
    "",
    "x" * 500,
    " ".join(["dog"] * 200),  # far longer than any context
    "it's we're they'll I'd",
    "12345 3.14159 1e-5",
]


def hf_ids(directory, texts: list[str], length: int) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(str(directory))
    return tok(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )["input_ids"]


@pytest.fixture(scope="module")
def clip_tok_dir(tmp_path_factory):
    """A CLIP-format tokenizer: CLIPTokenizer's own pipeline over a BPE vocabulary and merges
    learned from CORPUS (every byte, with and without `</w>`, is in the vocabulary)."""
    raw = RawTokenizer(models.BPE(end_of_word_suffix="</w>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    learned = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in [*sorted(alphabet), *(c + "</w>" for c in sorted(alphabet)), *learned["vocab"]]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    directory = tmp_path_factory.mktemp("clip-tok")
    tok.save_pretrained(directory)
    assert (directory / "tokenizer.json").is_file()
    return directory


@pytest.fixture(scope="module")
def siglip_tok_dir(tmp_path_factory):
    """A SigLIP-format tokenizer: a SentencePiece unigram model (pad 0, eos 1, unk 2, no BOS)
    behind transformers' SiglipTokenizer, saved with its spiece.model."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import SiglipTokenizer

    directory = tmp_path_factory.mktemp("siglip-tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(directory / "spiece"),
        vocab_size=48,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    tok = SiglipTokenizer(vocab_file=str(directory / "spiece.model"))
    out = directory / "saved"
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("length", [77, 12])
def test_clip_bpe_ids_equal_transformers(clip_tok_dir, length):
    ours = Tokenizer.from_file(clip_tok_dir, context_length=length)
    vocab = json.loads((clip_tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert ours.bos_id == vocab["<|startoftext|>"]
    assert ours.eot_id == ours.pad_id == vocab["<|endoftext|>"]  # CLIP pads with eos
    ids, truncated = ours.encode(BATTERY)
    assert torch.equal(ids, hf_ids(clip_tok_dir, BATTERY, length))
    full = AutoTokenizer.from_pretrained(str(clip_tok_dir))(BATTERY)["input_ids"]
    assert truncated == sum(len(x) > length for x in full) >= 2
    assert (
        ids[:, -1][ids[:, -1] != ours.pad_id] == ours.eot_id
    ).all()  # a cut row still ends in eot


@pytest.mark.parametrize("length", [32, 8])
def test_bert_wordpiece_ids_equal_transformers(length):
    directory = minilm_dir()
    ours = Tokenizer.from_file(directory, context_length=length)
    assert (ours.pad_id, ours.bos_id, ours.eot_id) == (0, 101, 102)  # [PAD], [CLS], [SEP]
    assert torch.equal(ours.encode(BATTERY)[0], hf_ids(directory, BATTERY, length))
    # the bare tokenizer.json alone (no tokenizer_config.json beside it) reads the same
    bare = Tokenizer.from_file(directory / "tokenizer.json", context_length=length)
    assert torch.equal(bare.encode(BATTERY)[0], ours.encode(BATTERY)[0])


@pytest.mark.parametrize("length", [64, 10])
def test_siglip_sentencepiece_ids_equal_transformers(siglip_tok_dir, length):
    ours = Tokenizer.from_file(siglip_tok_dir, context_length=length)
    assert ours.bos_id is None  # SigLIP adds no start token
    assert ours.eot_id == 1 and ours.pad_id == 1  # "</s>" ends and pads, as SigLIP ships
    ids, truncated = ours.encode(BATTERY)
    assert torch.equal(ids, hf_ids(siglip_tok_dir, BATTERY, length))
    assert truncated >= 2
    assert ids[0, 0] != ours.eot_id and ours.eot_id in ids[0].tolist()


def test_own_bpe_saves_a_directory_transformers_loads(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, context_length=16)
    tok.save_dir(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    got = loaded(BATTERY, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(got["input_ids"], tok.encode(BATTERY)[0])
    again = Tokenizer.from_file(tmp_path / "tok", context_length=16)
    assert (again.pad_id, again.bos_id, again.eot_id) == (tok.pad_id, tok.bos_id, tok.eot_id)


# --- imported models encode strings as transformers does ----------------------------------------


def hf_model_dir(family: str, tmp_path, tok_dir, *, text_layers: int = 2):
    """A tiny random HF CLIPModel / SiglipModel saved with the tokenizer in `tok_dir`:
    (model, tokenizer, directory)."""
    torch.manual_seed(0)
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=48)
    text = dict(**small, num_hidden_layers=text_layers, vocab_size=len(hf_tok),
                pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id)  # fmt: skip
    vision = dict(**small, num_hidden_layers=1, patch_size=8, image_size=32)
    if family == "clip":
        text.update(max_position_embeddings=77, bos_token_id=hf_tok.bos_token_id)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        hf = CLIPModel(cfg).eval()
    else:
        text.update(max_position_embeddings=64, projection_size=32)
        hf = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    directory = tmp_path / f"hf-{family}"
    hf.save_pretrained(directory)
    hf_tok.save_pretrained(directory)
    return hf, hf_tok, directory


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_imported_model_encodes_strings_like_transformers(family, tmp_path, request):
    tok_dir = request.getfixturevalue(f"{family}_tok_dir")
    hf, hf_tok, directory = hf_model_dir(family, tmp_path, tok_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tokenizer not used" warning any more
        model, run_cfg = import_hf(directory)
    length = hf.config.text_config.max_position_embeddings
    batch = hf_tok(
        BATTERY, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    with torch.no_grad():
        if family == "clip":
            out = hf.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        else:  # SigLIP is trained and run without an attention mask
            out = hf.get_text_features(input_ids=batch["input_ids"])
        want = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        got = model.encode_text(BATTERY)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # export writes the family's own tokenizer files back, and transformers reads them
    out_dir = export_hf(model, run_cfg, tmp_path / "export")
    again = AutoTokenizer.from_pretrained(str(out_dir))
    assert type(again).__name__ == type(hf_tok).__name__
    exported = again(BATTERY, padding="max_length", truncation=True, max_length=length)["input_ids"]
    assert exported == batch["input_ids"].tolist()

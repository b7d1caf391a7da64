"""The chat format of polysense's own VLM decoder: special tokens, the prompt template and the
byte-level BPE tokenizer that knows them. (An HF decoder renders the same turns with its own
tokenizer's chat template: `ChatPrompt` remembers the turns for it, models/vlm_hf.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from polysense.errors import PolysenseError
from polysense.fileio import atomic_path

PAD, BOS, EOS, IMAGE = "[PAD]", "[BOS]", "[EOS]", "<image>"
CAPTION_INSTRUCTION = "describe the image."
OCR_INSTRUCTION = "what is written here?"


class ChatPrompt(str):
    """A prompt string of polysense's template that also remembers its turns, so that an HF
    tokenizer can render the same conversation with its own chat template."""

    turns: tuple[tuple[str, str], ...]
    question: str

    def __new__(cls, text: str, *, turns: Sequence[tuple[str, str]], question: str) -> ChatPrompt:
        obj = super().__new__(cls, text)
        obj.turns, obj.question = tuple(turns), question
        return obj


def chat_prompt(instruction: str) -> str:
    """The chat template; the image tokens go where `<image>` stands. The string remembers its
    instruction, so an HF tokenizer renders it with its own chat template (`ChatPrompt`)."""
    return ChatPrompt(f"USER: {IMAGE}\n{instruction}\nASSISTANT:", turns=(), question=instruction)


def chat_turn(instruction: str) -> str:
    """A further turn of the conversation, after the previous answer and its [EOS]."""
    return f"\nUSER: {instruction}\nASSISTANT:"


def conversation(turns: Sequence[tuple[str, str]], question: str) -> str:
    """A prompt holding earlier (question, answer) turns, then `question` (chat history)."""
    text = ""
    for k, (q, a) in enumerate(turns):
        text += (chat_prompt(q) if k == 0 else chat_turn(q)) + f" {a}{EOS}"
    text += chat_prompt(question) if not turns else chat_turn(question)
    return ChatPrompt(text, turns=turns, question=question)


class ChatTokenizer:
    """Byte-level BPE (case kept: OCR text is upper case) with [PAD]/[BOS]/[EOS] and `<image>`."""

    def __init__(self, *, tokenizer: HFTokenizer) -> None:
        self._tok = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in (PAD, BOS, EOS, IMAGE) if t not in vocab]
        if missing:
            raise PolysenseError(f"tokenizer lacks the special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id = vocab[PAD], vocab[BOS], vocab[EOS]
        self.image_id = vocab[IMAGE]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], *, vocab_size: int = 512) -> ChatTokenizer:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS, IMAGE],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer=tok)

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTokenizer:
        path = Path(path)
        if not path.is_file():
            raise PolysenseError(f"{path} does not exist: the checkpoint has no tokenizer")
        return cls(tokenizer=HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self._tok.save(str(tmp))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True).strip()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos_id, *self.encode(prompt)]

    def response_ids(self, response: str) -> list[int]:
        return [*self.encode(" " + response), self.eos_id]

    def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """Ids of (instruction, response) turns in the template, and a flag per token: True on
        each response and its [EOS] (the targets)."""
        row, flags = [], []
        for k, (instruction, response) in enumerate(turns):
            p = (
                self.prompt_ids(chat_prompt(instruction))
                if k == 0
                else self.encode(chat_turn(instruction))
            )
            a = self.response_ids(response)
            row += p + a
            flags += [False] * len(p) + [True] * len(a)
        return row, flags

    def scored_row(self, prompt: str, response: str, *, eos: bool) -> tuple[list[int], int]:
        """(ids of prompt + response, number of prompt tokens) for `VLM.score`."""
        p, r = self.prompt_ids(prompt), self.response_ids(response)
        return p + (r if eos else r[:-1]), len(p)

"""A fresh Hugging Face causal LM of polysense's LM sizes, for pretraining from scratch.

`polysense train lm-tiny --set decoder=qwen2` builds, instead of polysense's GPT, a randomly
initialised `Qwen2ForCausalLM` whose sizes come from the preset's `LMConfig` and a tokenizer in
Qwen2's own format trained on the run's text:

- the tokenizer is transformers' `Qwen2Tokenizer` (Qwen2's pre-tokenizer regex, byte-level BPE,
  `<|endoftext|>` for padding, `<|im_end|>` ending a turn, no BOS) retrained on the texts with
  `train_new_from_iterator`, and the ChatML chat template (without Qwen2-Instruct's default
  system turn, which would only lengthen every tiny-world row);
- the model is a `Qwen2Config` with the GPT's width, layers, heads and context, tied input/output
  embeddings as the GPT has, and a SwiGLU hidden size of 2/3 of the GPT's MLP so that both MLPs
  hold the same number of weights (three matrices against two).

The trained LM is saved as a plain transformers directory (`save_pretrained`), so
`AutoModelForCausalLM.from_pretrained` reads it and `init.lm` of the VLM stages takes it as it
takes any Hugging Face LM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from polysense.errors import PolysenseError
from polysense.models.lm import LMConfig
from polysense.models.text import quiet_transformers
from polysense.models.vlm_hf import HFCausalLM, HFChatTokenizer

ARCHS = ("qwen2",)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise PolysenseError(
            f"decoder={arch!r}: a fresh Hugging Face LM can be one of {', '.join(ARCHS)} "
            "(or 'polysense' for polysense's GPT); to start from an existing HF LM, pass its "
            "directory as init.lm of a VLM stage"
        )


def base_tokenizer(arch: str) -> HFChatTokenizer:
    """`arch`'s tokenizer format with its chat template and no merges yet (every byte a token):
    it renders the chat texts that `train_tokenizer` then learns from."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    check_arch(arch)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    with quiet_transformers():
        tok = Qwen2TokenizerFast(
            vocab={c: i for i, c in enumerate(alphabet)},
            merges=[],
            unk_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=list(QWEN2_SPECIALS),
        )
    tok.chat_template = CHATML_TEMPLATE
    return HFChatTokenizer(tokenizer=tok)


def train_tokenizer(
    base: HFChatTokenizer, texts: Iterable[str], *, vocab_size: int
) -> HFChatTokenizer:
    """`base`'s format (pre-tokenizer, special tokens, chat template) with `vocab_size` tokens
    learned from `texts` (transformers' `train_new_from_iterator`)."""
    with quiet_transformers():
        tok = base.hf.train_new_from_iterator(list(texts), vocab_size=vocab_size)
    tok.chat_template = base.hf.chat_template
    return HFChatTokenizer(tokenizer=tok)


def fresh_lm(arch: str, cfg: LMConfig, *, vocab_size: int, eos_id: int, pad_id: int) -> HFCausalLM:
    """A randomly initialised transformers LM of `cfg`'s sizes (drawn from torch's RNG)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    check_arch(arch)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.width,
        intermediate_size=round(cfg.width * cfg.mlp_ratio * 2 / 3),
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with quiet_transformers():
        model: Any = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return HFCausalLM(model=model)


def fresh_hf_lm(
    arch: str, cfg: LMConfig, texts: Callable[[HFChatTokenizer], list[str]], *, seed: int
) -> tuple[HFCausalLM, HFChatTokenizer]:
    """(LM, tokenizer) of `arch` at `cfg`'s sizes. `texts(base)` gives the corpus, its chats
    rendered with the base tokenizer's template; the tokenizer learns `cfg.vocab_size` tokens
    from it, and the weights are drawn after `torch.manual_seed(seed)`."""
    base = base_tokenizer(arch)
    tok = train_tokenizer(base, texts(base), vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    lm = fresh_lm(arch, cfg, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return lm, tok

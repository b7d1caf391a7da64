"""The LM stage with a fresh transformers decoder (`polysense train lm-tiny --set decoder=qwen2`,
models/hf_decoder.py): the tokenizer is Qwen2's own format, the model is lm-tiny's size, the saved
directory is what transformers loads, and the stage learns the world's text.
Resume, reload and stage 1 on its output are in test_presets_contract.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from polysense.cli import app
from polysense.data.instruct import load_split, world_texts
from polysense.data.world import generate_world
from polysense.eval.vlm import lm_val_loss
from polysense.models.checkpoint import load_lm
from polysense.models.hf_decoder import base_tokenizer, fresh_hf_lm
from polysense.models.lm import GPT, LMConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf-decoder-world")
    generate_world(root, n=200, seed=5, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-qwen2")
    sets = ["decoder=qwen2", "train.steps=60", "train.batch_size=16", "train.warmup_steps=5"]
    args = ["train", "lm-tiny", "--data", str(world), "--out", str(out), "--eval-splits", "val"]
    result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    return out


def test_the_tokenizer_is_qwen2s_format_trained_on_the_world(world, trained):
    tok = AutoTokenizer.from_pretrained(str(trained))
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert tok.bos_token is None
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # Qwen2's pre-tokenizer splits numbers into single digits
    assert tok.tokenize("2026") == ["2", "0", "2", "6"]
    # ChatML, the template Qwen2's chat models use
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # byte-level BPE: every world text comes back exactly; learned merges make it shorter
    texts = world_texts(load_split(world, "val", image_size=32), base_tokenizer("qwen2").text_chat)
    for t in texts[:200]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
        assert len(ids) < len(t.encode())
    caption = texts[0]
    assert all(tok.convert_ids_to_tokens(i) for i in tok(caption)["input_ids"])


def test_the_model_has_lm_tinys_size_and_loads_in_transformers(world, trained):
    cfg = LMConfig(vocab_size=512, context_length=128, width=128, layers=4, heads=4)
    texts = world_texts(load_split(world, "train", image_size=32))
    lm, tok = fresh_hf_lm("qwen2", cfg, lambda base: texts, seed=0)
    gpt = GPT(cfg=LMConfig(**{**cfg.__dict__, "vocab_size": tok.vocab_size}))
    n_hf = sum(p.numel() for p in lm.parameters())
    n_gpt = sum(p.numel() for p in gpt.parameters())
    assert abs(n_hf - n_gpt) / n_gpt < 0.05, (n_hf, n_gpt)
    config = lm.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        128,
        4,
        4,
    )
    assert config.tie_word_embeddings

    ours, ours_tok, run = load_lm(trained)
    assert run.decoder == "qwen2" and run.model.width == 128
    theirs = AutoModelForCausalLM.from_pretrained(str(trained)).eval()
    ids = torch.tensor([ours_tok.encode("what color is the circle? red")])  # (1, T)
    with torch.no_grad():
        logits, _ = ours(ours.token_embed(ids), torch.ones_like(ids, dtype=torch.bool))
        ref = theirs(input_ids=ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_the_stage_learns_the_world_text(world, trained):
    """60 steps take the held-out loss far below a uniform guess over the vocabulary (ln V)."""
    _, tok, _ = load_lm(trained)
    loss = lm_val_loss(trained, world, "val")
    assert loss < 0.6 * math.log(tok.vocab_size), loss


def test_unknown_decoders_and_lora_are_one_line_errors(world, tmp_path, capsys):
    from test_cli_errors import assert_one_line_error, run_cli

    for sets, words in (
        (["decoder=llama"], "decoder='llama'"),
        (["decoder=qwen2", "train.lora_rank=4"], "train.lora_rank=4"),
    ):
        args = ["train", "lm-tiny", "--data", str(world), "--out", str(tmp_path / "x")]
        code, _, err = run_cli(capsys, *args, *(a for s in sets for a in ("--set", s)))
        assert_one_line_error(code, err, words)

"""The VLM on Hugging Face parts: any causal LM as the decoder (tiny random Llama, Qwen2, GPT-2
built with `save_pretrained`), its tokenizer's chat template, an HF CLIP vision tower at LLaVA's
feature layer, and LLaVA itself: logits equal `LlavaForConditionalGeneration` holding the same
weights, and `export-hf` writes a LLaVA directory that transformers loads and generates from with
polysense's greedy tokens. Nothing downloads: every model and tokenizer is built here."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from typer.testing import CliRunner

from polysense.data.chat import CAPTION_INSTRUCTION, chat_prompt, conversation
from polysense.data.world import generate_world
from polysense.decoding import LMStepper
from polysense.errors import PolysenseError
from polysense.models.checkpoint import load_vlm, save_vlm
from polysense.models.vlm import InitConfig, VLMConfig, VLMRunConfig, VLMTrainConfig
from polysense.models.vlm_hf import import_llava
from polysense.models.warmstart import build_vlm
from polysense.train.vlm import train_stage

pytestmark = pytest.mark.filterwarnings("ignore")

CORPUS = [
    "a red circle left of a blue square",
    "two small green triangles above a large yellow star",
    "what color is the circle? red",
    "how many shapes are there? three",
    "is there a purple star? no",
    "describe the image. one shape: a large orange square",
    "USER: ASSISTANT: [INST] [/INST] user assistant",
] * 10
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe(specials: list[str]) -> RawTokenizer:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    return raw


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: <s> / </s>, its [INST] chat template, and an <image> token."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<pad>", "<s>", "</s>", "<image>"]),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
    )
    tok.chat_template = LLAMA_TEMPLATE
    return tok


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2 style: ChatML, eos <|im_end|>, no BOS and no <image> token (polysense adds it)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _save(model, tok, directory: Path) -> Path:
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    tok = llama_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.2,
    )  # fmt: skip
    return _save(LlamaForCausalLM(cfg), tok, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    tok = qwen_tokenizer()
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return _save(Qwen2ForCausalLM(cfg), tok, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    tok = llama_tokenizer()
    tok.chat_template = None  # no template: polysense's USER/ASSISTANT one is used
    torch.manual_seed(2)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return _save(GPT2LMHeadModel(cfg), tok, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny HF CLIPModel for 32 px images (patches of 8: 16 patches + cls)."""
    torch.manual_seed(3)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("hf-clip")
    CLIPModel(cfg).save_pretrained(directory)
    crop = {"height": 32, "width": 32}
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm-hf-world")
    generate_world(root, n=40, seed=5, modalities=("image", "text", "ocr"), workers=1)
    return root


def llava_run(lm: Path, vision: Path, **model) -> VLMRunConfig:
    return VLMRunConfig(
        name="vlm-hf-test",
        model=VLMConfig(
            **{"projector": "mlp2x", "feature_layer": -2, "feature_select": "patch"} | model
        ),
        init=InitConfig(lm=str(lm), vision=str(vision)),
    )


def scene(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())


def _hf_lm(directory: Path):
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}
    name = next(k for k in cls if k in directory.name)
    return cls[name].from_pretrained(directory).eval()


# ---------------------------------------------------------------------------------------------
# any causal LM as the decoder


@pytest.mark.parametrize("lm_fixture", ["llama_dir", "qwen2_dir", "gpt2_dir"])
def test_hf_decoder_left_padded_and_cached_equals_transformers(lm_fixture, clip_dir, request):
    """Each row of a left-padded batch, run through the HF decoder with polysense's masks and
    positions, gives the logits transformers gives for that row alone; KV-cached steps equal it."""
    lm_dir = request.getfixturevalue(lm_fixture)
    model, _ = build_vlm(llava_run(lm_dir, clip_dir))
    model.eval()
    assert model.cfg.decoder == "hf"
    ref = _hf_lm(lm_dir)
    ids = [model.tokenizer.encode(t) for t in ("a red circle left of", "two small green")]
    n = max(map(len, ids))
    x = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for r, row in enumerate(ids):
        x[r, n - len(row) :], mask[r, n - len(row) :] = torch.tensor(row), True
    with torch.no_grad():
        full, _ = model.lm(model.lm.token_embed(x), mask)  # (2, n, V)
        stepper = LMStepper(model.lm)
        logits, state = stepper.start(model.lm.token_embed(x[:, :-2]), mask[:, :-2])
        steps = [logits]
        for t in (n - 2, n - 1):
            logits, state = stepper.step(x[:, t], state)
            steps.append(logits)
        for r, row in enumerate(ids):
            alone = ref(input_ids=torch.tensor([row])).logits[0]  # (L, V)
            mine = full[r, n - len(row) :, : alone.shape[-1]]  # (Qwen2: + the <image> row)
            torch.testing.assert_close(mine, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.stack(steps, 1), full[:, -3:], atol=1e-5, rtol=1e-5)


def _ids(rendered) -> list[int]:
    """apply_chat_template(tokenize=True) gives ids, or an encoding holding them."""
    return list(rendered if isinstance(rendered, list) else rendered["input_ids"])


def test_prompts_and_targets_follow_the_tokenizers_chat_template(llama_dir, qwen2_dir, clip_dir):
    for lm_dir, end in ((llama_dir, "</s>"), (qwen2_dir, "<|im_end|>\n")):
        model, _ = build_vlm(llava_run(lm_dir, clip_dir))
        tok = model.tokenizer
        user = [{"role": "user", "content": "<image>\nwhat color is the circle?"}]
        expected = tok.hf.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        expected = _ids(expected)
        assert model.prompt_ids(chat_prompt("what color is the circle?")) == list(expected)
        assert expected.count(tok.image_id) == 1
        turns = [("what color is the circle?", "red"), ("how many shapes?", "two")]
        ids, flags = tok.conversation_ids(turns)
        msgs = [*user, {"role": "assistant", "content": "red"}]
        msgs += [{"role": "user", "content": "how many shapes?"}]
        msgs += [{"role": "assistant", "content": "two"}]
        whole = tok.hf.apply_chat_template(msgs, tokenize=True)
        assert ids == _ids(whole)
        targets = tok.hf.decode([i for i, f in zip(ids, flags, strict=True) if f])
        assert targets.replace(" ", "") == f"red{end}two{end}".replace(" ", "")
        # a multi-turn prompt renders its history with the template too
        history = tok.hf.apply_chat_template(msgs[:3], add_generation_prompt=True, tokenize=False)
        assert model.prompt_ids(conversation(turns[:1], "how many shapes?")) == tok.encode(history)


def test_qwen2_without_an_image_token_gets_one(qwen2_dir, clip_dir):
    model, _ = build_vlm(llava_run(qwen2_dir, clip_dir))
    n_before = len(qwen_tokenizer())
    assert model.tokenizer.image_id == n_before  # appended
    assert model.lm.token_embed.num_embeddings == n_before + 1 == model.cfg.lm.vocab_size
    ref = _hf_lm(qwen2_dir)
    torch.testing.assert_close(
        model.lm.token_embed.weight[:n_before], ref.get_input_embeddings().weight
    )


# ---------------------------------------------------------------------------------------------
# LLaVA-exact


def hand_built_llava(model, clip_dir: Path, llama_dir: Path) -> LlavaForConditionalGeneration:
    """The LLaVA holding the same weights, assembled from the HF parts by transformers' own
    module names (the independent reference; nothing of polysense's export is used)."""
    from transformers import AutoModelForCausalLM

    clip = CLIPModel.from_pretrained(clip_dir)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    cfg = LlavaConfig(
        vision_config=clip.config.vision_config,
        text_config=llama.config,
        image_token_index=model.tokenizer.image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.model.language_model.load_state_dict(llama.model.state_dict())
    llava.lm_head.load_state_dict(llama.lm_head.state_dict())
    proj = llava.model.multi_modal_projector
    proj.linear_1.load_state_dict(model.projector[0].state_dict())
    proj.linear_2.load_state_dict(model.projector[2].state_dict())
    return llava


def test_logits_equal_llava_for_conditional_generation(llama_dir, clip_dir):
    """(HF CLIP vision at layer -2, patch tokens; MLP projector; HF Llama) = transformers' LLaVA
    within 1e-4, on a left-padded batch of two prompts with an image each."""
    model, _ = build_vlm(llava_run(llama_dir, clip_dir))
    model.eval()
    llava = hand_built_llava(model, clip_dir, llama_dir)
    images = [scene(0), scene(1)]
    prompts = [chat_prompt("what color is the circle?"), chat_prompt(CAPTION_INSTRUCTION)]
    pix = model.pixels(images)  # (1, 3, 32, 32) each: the CLIP processor's tensors
    n_img = 16  # 4 x 4 patches, cls dropped
    worst = 0.0
    with torch.no_grad():
        batch = model.build_batch([model.prompt_ids(p) for p in prompts], model.image_tokens(pix))
        ours, _ = model.lm(batch.embeds, batch.key_mask)  # (2, T, V)
        for r, p in enumerate(prompts):
            ids = model.prompt_ids(p)
            at = ids.index(model.tokenizer.image_id)
            expanded = ids[:at] + [model.tokenizer.image_id] * n_img + ids[at + 1 :]
            theirs = llava(input_ids=torch.tensor([expanded]), pixel_values=pix[r]).logits[0]
            mine = ours[r, ours.shape[1] - len(expanded) :]
            worst = max(worst, float((mine - theirs).abs().max()))
    print(f"max |polysense - LlavaForConditionalGeneration| logits: {worst:.2e}")
    assert worst < 1e-4
    assert float(theirs.std()) > 0.1  # not a trivial agreement of near-zero logits


# name: vision (image size, patch, width, heads, mlp), LM (class, hidden, heads, kv heads, mlp)
REAL = {
    "llava-1.5-7b": ((336, 14, 1024, 16, 4096), (LlamaConfig, 4096, 32, 32, 11008)),
    "clip-l14-qwen2-0.5b": ((336, 14, 1024, 16, 4096), (Qwen2Config, 896, 14, 2, 4864)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_logits_equal_llava_at_real_dimensions(name, tmp_path):
    """LLaVA-1.5-7B's dimensions (CLIP ViT-L/14-336: 577 tokens, Llama 4096 wide, 32 heads of
    128, MLP 11008) and CLIP-L + Qwen2-0.5B's (GQA 14/2 heads), one layer per tower and the
    test tokenizer's vocabulary: polysense's logits on a real-size photo equal the hand-assembled
    LlavaForConditionalGeneration's within 1e-4."""
    (size, patch, vw, vh, vm), (lm_cfg, hidden, heads, kv, mlp) = REAL[name]
    torch.manual_seed(0)
    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=vw, num_attention_heads=vh, intermediate_size=vm,
                           num_hidden_layers=2, image_size=size, patch_size=patch),
        projection_dim=16,
    )  # fmt: skip
    clip_dir = tmp_path / "clip"
    CLIPModel(clip_cfg).save_pretrained(clip_dir)
    crop = {"height": size, "width": size}
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop).save_pretrained(clip_dir)
    tok = llama_tokenizer()
    cfg = lm_cfg(
        vocab_size=len(tok) + 8, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    lm_dir = _save(LlamaForCausalLM(cfg) if lm_cfg is LlamaConfig else Qwen2ForCausalLM(cfg),
                   tok, tmp_path / "lm")  # fmt: skip
    model, _ = build_vlm(llava_run(lm_dir, clip_dir))
    model.eval()
    llava = hand_built_llava(model, clip_dir, lm_dir)
    photo = scene(8).resize((640, 427))
    prompt = chat_prompt("what is in the picture?")
    n_img = (size // patch) ** 2
    with torch.no_grad():
        pix = model.pixels([photo])
        batch = model.build_batch([model.prompt_ids(prompt)], model.image_tokens(pix))
        ours, _ = model.lm(batch.embeds, batch.key_mask)
        ids = model.prompt_ids(prompt)
        at = ids.index(model.tokenizer.image_id)
        expanded = ids[:at] + [model.tokenizer.image_id] * n_img + ids[at + 1 :]
        theirs = llava(input_ids=torch.tensor([expanded]), pixel_values=pix[0]).logits
        other = llava(input_ids=torch.tensor([expanded]), pixel_values=-pix[0]).logits
    assert ours.shape == theirs.shape == (1, len(expanded), len(tok) + 8)
    assert float((other - theirs)[0, at + n_img :].abs().max()) > 1e-2  # the image counts
    worst = float((ours - theirs).abs().max())
    print(
        f"{name}: max |polysense - LLaVA| logits {worst:.2e} (logit std {float(theirs.std()):.2f})"
    )
    assert worst < 1e-4


def test_export_hf_loads_in_transformers_and_generates_polysense_greedy_tokens(
    llama_dir, clip_dir, tmp_path
):
    from polysense.cli import app

    model, run = build_vlm(llava_run(llama_dir, clip_dir))
    with torch.no_grad():
        model.tile_embed.normal_(std=0.5)  # folded into the projector's bias on export
    ckpt = save_vlm(model.eval(), run, model.tokenizer, tmp_path / "ckpt")
    runner = CliRunner()
    res = runner.invoke(app, ["export-hf", str(ckpt), "--out", str(tmp_path / "llava")])
    assert res.exit_code == 0, res.output
    image_path = tmp_path / "scene.png"
    scene(4).save(image_path)
    question = "what color is the circle?"
    res = runner.invoke(app, ["ask", "--ckpt", str(ckpt), str(image_path), question])
    assert res.exit_code == 0, res.output
    asked = res.output.strip()

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    msgs = [{"role": "user", "content": f"<image>\n{question}"}]
    text = processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        images=Image.open(image_path), text=text, return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(hf.generation_config.eos_token_id)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    loaded = load_vlm(ckpt)
    ours = loaded.generate_ids([Image.open(image_path)], [chat_prompt(question)], max_new_tokens=16)
    assert ours[0] == new and len(new) >= 4
    assert asked == processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    # import-hf reads the LLaVA directory back: the same answer
    res = runner.invoke(
        app, ["import-hf", str(tmp_path / "llava"), "--out", str(tmp_path / "back")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ask", "--ckpt", str(tmp_path / "back"), str(image_path), question])
    assert res.exit_code == 0 and res.output.strip() == asked, res.output
    back = import_llava(tmp_path / "llava")
    assert back.cfg.feature_layer == -2 and back.cfg.feature_select == "patch"
    # and `ask` reads the LLaVA directory itself
    res = runner.invoke(app, ["ask", "--ckpt", str(tmp_path / "llava"), str(image_path), question])
    assert res.exit_code == 0 and res.output.strip() == asked, res.output


def test_what_llava_cannot_hold_is_a_one_line_error(qwen2_dir, clip_dir, tmp_path, capsys):
    from test_cli_errors import run_cli

    model, run = build_vlm(llava_run(qwen2_dir, clip_dir, feature_layer=-1))
    ckpt = save_vlm(model, run, model.tokenizer, tmp_path / "ckpt")
    code, out, err = run_cli(capsys, "export-hf", str(ckpt), "--out", str(tmp_path / "x"))
    assert code != 0 and "model.feature_layer=-1" in out + err
    assert "Traceback" not in out + err and len((out + err).strip().splitlines()) <= 3
    with pytest.raises(PolysenseError, match="count from the end"):
        VLMConfig(feature_layer=0)


# ---------------------------------------------------------------------------------------------
# training through the HF path


def test_train_stage1_and_stage2_with_qwen2_and_hf_clip_then_ask(
    world, qwen2_dir, clip_dir, tmp_path
):
    """`polysense train vlm-tiny-stage1/2 --set init.lm=QWEN2 --set init.vision=HF_CLIP` on the
    world: stage 1 moves only the projector (LM and ViT stay the HF files' weights), stage 2
    moves the LM, and `polysense ask` answers from the stage-2 checkpoint."""
    from polysense.cli import app

    runner = CliRunner()
    common = ["--data", str(world), "--eval-splits", "", "--set", "train.batch_size=4",
              "--set", "train.warmup_steps=1", "--set", "model.feature_layer=-2",
              "--set", "model.feature_select=patch"]  # fmt: skip
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    args = ["train", "vlm-tiny-stage1", "--out", str(s1), *common, "--set", "train.steps=3",
            "--set", f"init.lm={qwen2_dir}", "--set", f"init.vision={clip_dir}"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    args = ["train", "vlm-tiny-stage2", "--out", str(s2), *common, "--set", "train.steps=3",
            "--set", f"init.vlm={s1}", "--set", f"init.vision={clip_dir}",
            "--set", "train.scst.fraction=0.34", "--set", "train.scst.batch_size=2",
            "--set", "train.scst.samples=2", "--set", "train.scst.max_new_tokens=4"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output

    qwen = load_file(next(qwen2_dir.glob("*.safetensors")))
    w1, w2 = load_file(s1 / "model.safetensors"), load_file(s2 / "model.safetensors")
    key = "lm.model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w1[key], qwen["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(w2[key], w1[key])
    torch.manual_seed(0)  # train.seed: the projector stage 1 started from
    built, _ = build_vlm(llava_run(qwen2_dir, clip_dir))
    assert not torch.equal(w1["projector.0.weight"], built.projector[0].weight.detach())
    clip_vis = CLIPModel.from_pretrained(clip_dir).vision_model.state_dict()
    assert torch.equal(
        w1["visual.patch_embed.weight"], clip_vis["embeddings.patch_embedding.weight"]
    )
    loaded = load_vlm(s2)
    assert loaded.cfg.decoder == "hf" and loaded.tokenizer.hf.chat_template == CHATML_TEMPLATE
    image_path = tmp_path / "scene.png"
    scene(5).save(image_path)
    res = runner.invoke(app, ["ask", "--ckpt", str(s2), str(image_path), "what color is it?"])
    assert res.exit_code == 0, res.output
    expected = loaded.generate([Image.open(image_path)], [chat_prompt("what color is it?")])
    assert res.output.strip() == expected[0]
    assert dataclasses.asdict(loaded.cfg)["lm"]["width"] == 32
    assert (s2 / "lm" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# LoRA (peft) and gradient checkpointing


def _train(lm: Path, vision: Path, **train) -> VLMRunConfig:
    base = {"batch_size": 4, "steps": 3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2}
    return dataclasses.replace(llava_run(lm, vision), train=VLMTrainConfig(**(base | train)))


def test_lora_trains_only_the_adapters_and_the_checkpoint_holds_merged_weights(
    world, llama_dir, clip_dir, tmp_path
):
    """train.lora_rank=4: the trainable parameters are peft's adapters on q_proj/v_proj (peft's
    default for Llama) plus the projector, by the hand count; after training, every other LM
    weight equals the HF file's, q_proj/v_proj moved (merged into the checkpoint, which loads
    without peft)."""
    run = _train(llama_dir, clip_dir, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    summary = train_stage(run, data=world, out=tmp_path / "lora", progress=False)
    r, width, kv = 4, 32, 16  # Llama: 2 key/value heads of 8
    lora = 2 * (r * (width + width) + r * (width + kv))  # 2 layers x (q_proj + v_proj)
    projector = 2 * (width * width + width) + 4 * width  # mlp2x + the tile embedding
    assert summary["trainable_params"] == lora + projector
    ref = load_file(next(llama_dir.glob("*.safetensors")))
    saved = load_file(tmp_path / "lora" / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    for k, v in ref.items():
        moved = not torch.equal(saved[f"lm.model.{k}"], v)
        assert moved == (".q_proj." in k or ".v_proj." in k), k
    load_vlm(tmp_path / "lora")  # a plain model reads it


def test_merged_lora_weights_give_the_lora_models_logits(llama_dir, clip_dir):
    """peft's LoRA forward (the reference) = a plain model holding `merged_state_dict`."""
    from polysense.models.vlm_hf import add_lora, merged_state_dict

    model, _ = build_vlm(llava_run(llama_dir, clip_dir))
    plain, _ = build_vlm(llava_run(llama_dir, clip_dir))
    model.eval(), plain.eval()
    add_lora(model.lm, rank=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj,down_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # peft starts B at 0; a trained adapter is not
        prompt = model.prompt_ids(chat_prompt("what?"))
        batch = model.build_batch([prompt], model.image_tokens([scene()]))
        with_lora, _ = model.lm(batch.embeds, batch.key_mask)
        base, _ = plain.lm(batch.embeds, batch.key_mask)
        plain.load_state_dict(merged_state_dict(model))
        merged, _ = plain.lm(batch.embeds, batch.key_mask)
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)
    assert float((with_lora - base).abs().max()) > 1e-2  # the adapters changed the function


def test_a_lora_run_resumes_exactly(world, llama_dir, clip_dir, tmp_path, monkeypatch):
    from test_vlm import run_whole_and_killed

    run = _train(llama_dir, clip_dir, lora_rank=4, mix_qa=1.0)
    full, killed = run_whole_and_killed(run, world, tmp_path, monkeypatch, at=2)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("hf", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(hf, llama_dir, clip_dir):
    from polysense.models.lm import GPT, LMConfig
    from polysense.models.vlm import VLM
    from polysense.train.vlm import prepare_lm, set_trainable

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        if hf:
            model, _ = build_vlm(llava_run(llama_dir, clip_dir))
        else:
            ref, _ = build_vlm(llava_run(llama_dir, clip_dir))
            cfg = dataclasses.replace(ref.cfg, decoder="polysense", lm=LMConfig(
                vocab_size=ref.tokenizer.vocab_size, width=32, layers=2, heads=2))  # fmt: skip
            from polysense.models.vlm_hf import HFChatTokenizer

            model = VLM(cfg=cfg, tokenizer=HFChatTokenizer(tokenizer=ref.tokenizer.hf))
            assert isinstance(model.lm, GPT)
        tc = VLMTrainConfig(grad_checkpointing=checkpointing, train_vision_top=1)
        prepare_lm(model, tc)
        set_trainable(model, tc)
        model.train()
        on = model.lm.model.is_gradient_checkpointing if hf else model.lm.grad_checkpointing
        assert on == checkpointing and model.visual.grad_checkpointing == checkpointing
        ids, flags = model.tokenizer.conversation_ids([("what color?", "red")])
        batch = model.build_batch([ids], model.image_tokens([scene()]), targets=[flags])
        model.loss(batch).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# any vision tower


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(6)
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("hf-siglip")
    SiglipModel(cfg).save_pretrained(directory)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tower", ["clip_dir", "siglip_dir"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_vision_tokens_are_the_towers_hidden_states(tower, layer, llama_dir, request):
    """init.vision=HF CLIP/SigLIP dir: the tokens the projector reads are transformers'
    hidden_states[layer] (-1: after post_layernorm, polysense's final LayerNorm), the cls token
    dropped by feature_select=patch; the images go through that tower's own processor."""
    from transformers import AutoImageProcessor, AutoModel

    directory = request.getfixturevalue(tower)
    run = llava_run(llama_dir, directory, feature_layer=layer)
    model, _ = build_vlm(run)
    model.eval()
    hf = AutoModel.from_pretrained(directory).vision_model.eval()
    image = scene(7).resize((45, 37))
    processor = AutoImageProcessor.from_pretrained(directory)
    pix = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.pixels([image])[0], pix, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        states = hf(pixel_values=pix, output_hidden_states=True).hidden_states
        expected = states[layer] if layer != -1 else hf.post_layernorm(states[-1])
        if tower == "clip_dir":
            expected = expected[:, 1:]  # "patch": cls dropped
        ours = model.encode_tiles(pix[None])  # (1, N, C) after the projector
        proj = model.projector(expected)
    assert ours.shape == proj.shape == (1, 16, 32)
    torch.testing.assert_close(ours, proj, atol=1e-5, rtol=1e-5)


def test_an_init_lm_that_is_not_a_causal_lm_is_a_one_line_error(world, clip_dir, tmp_path, capsys):
    from test_cli_errors import run_cli

    args = ["train", "vlm-tiny-stage1", "--data", str(world), "--out", str(tmp_path / "x"),
            "--eval-splits", "", "--set", f"init.lm={clip_dir}",
            "--set", f"init.vision={clip_dir}"]  # fmt: skip
    code, out, err = run_cli(capsys, *args)
    assert code != 0 and "model_type='clip'" in out + err and "init.lm" in out + err
    assert "Traceback" not in out + err


def test_a_siglip_tower_exports_to_llava_too(llama_dir, siglip_dir, tmp_path):
    """HF SigLIP vision (no cls: LLaVA's "full" strategy, no extra image token) + Llama: the
    export generates polysense's greedy tokens in transformers, and reads back equal."""
    model, run = build_vlm(llava_run(llama_dir, siglip_dir, feature_select="full"))
    ckpt = save_vlm(model.eval(), run, model.tokenizer, tmp_path / "ckpt")
    from polysense.models.checkpoint import export_checkpoint, import_to_checkpoint

    export_checkpoint(ckpt, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert hf.config.vision_config.model_type == "siglip_vision_model"
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    image, question = scene(9).resize((50, 40)), "how many shapes are there?"
    msgs = [{"role": "user", "content": f"<image>\n{question}"}]
    text = processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
    assert (inputs["input_ids"] == model.tokenizer.image_id).sum() == 16  # 4 x 4 patches
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(hf.generation_config.eos_token_id)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    ours = load_vlm(ckpt).generate_ids([image], [chat_prompt(question)], max_new_tokens=12)[0]
    assert ours == new and len(new) >= 4
    back = load_vlm(import_to_checkpoint(tmp_path / "llava", tmp_path / "back"))
    assert back.generate_ids([image], [chat_prompt(question)], max_new_tokens=12)[0] == new


def test_generation_stops_at_the_lms_generation_config_eos_too(llama_dir, clip_dir, tmp_path):
    """A chat LM whose generation_config.json names a second end token (Llama-3's <|eot_id|>
    beside <|end_of_text|>) stops there as well; the checkpoint keeps it."""
    directory = tmp_path / "llama-eot"
    shutil.copytree(llama_dir, directory)
    tok = llama_tokenizer()
    eot = tok.convert_tokens_to_ids("[")  # any id: stands for <|eot_id|>
    gen = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(
        json.dumps(gen | {"eos_token_id": [tok.eos_token_id, eot]})
    )
    model, run = build_vlm(llava_run(directory, clip_dir))
    assert model.tokenizer.stop_ids == (tok.eos_token_id, eot)
    loaded = load_vlm(save_vlm(model, run, model.tokenizer, tmp_path / "ckpt"))
    assert loaded.tokenizer.stop_ids == (tok.eos_token_id, eot)
    assert eot not in loaded.banned_ids()
    ids = loaded.generate_ids([scene()], [chat_prompt("what?")], max_new_tokens=30)[0]
    assert eot not in ids and tok.eos_token_id not in ids

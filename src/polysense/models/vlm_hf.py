"""Hugging Face parts of the VLM: any `AutoModelForCausalLM` directory as the decoder (with its
tokenizer and chat template), and LLaVA directories both ways.

- `HFCausalLM` drives a transformers causal LM with the interface of polysense's `GPT`
  (`token_embed`, `forward(embeds, key_mask, cache) -> (logits, cache)`): image tokens are spliced
  into `inputs_embeds` at the `<image>` placeholder, as LLaVA does; left-padded rows get a 2-D
  attention mask and position ids that count only real tokens.
- `HFChatTokenizer` renders prompts and training conversations with the tokenizer's own chat
  template (`apply_chat_template`; polysense's `USER: ... ASSISTANT:` as a Jinja template where a
  tokenizer has none). A user turn with an image holds `<image>\\n{instruction}`; `<image>` is added
  as a special token when the tokenizer lacks it (the LM's embeddings grow by one row).
- `export_llava` writes a polysense VLM (HF decoder, CLIP vision, `mlp2x` projector) as a
  `LlavaForConditionalGeneration` directory with a `LlavaProcessor`; `import_llava` reads one.

Nothing runs remote code; weights load from safetensors (or `.bin` through torch's restricted
unpickler, `models.hf._load_hf`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polysense.config import ModelConfig, TextConfig, VisionConfig
from polysense.data.chat import IMAGE, ChatPrompt
from polysense.errors import PolysenseError
from polysense.fileio import files_into
from polysense.models.hf import (
    _load_hf,
    _write_preprocessor,
    convert,
    hf_vision_fields,
    key_pairs,
    vision_config_from_hf,
)
from polysense.models.lm import LMConfig, positions_from_mask
from polysense.models.text import quiet_transformers
from polysense.models.vlm import VLM, VLMConfig, VLMRunConfig

# polysense's template (data.chat.chat_prompt / conversation) for a tokenizer without its own
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if not loop.first %}\n{% endif %}USER: {{ m['content'] }}\nASSISTANT:"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
LM_DIR = "lm"  # a VLM checkpoint keeps its HF decoder's config.json here


def messages(
    turns: Sequence[tuple[str, str]], question: str | None, *, image: bool = True
) -> list[dict[str, str]]:
    """Chat messages: with `image`, the first user turn carries it (`<image>\\n` before its
    text)."""
    out = []
    pairs = [*turns, (question, None)] if question is not None else list(turns)
    for k, (q, a) in enumerate(pairs):
        out.append({"role": "user", "content": f"{IMAGE}\n{q}" if k == 0 and image else q})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json names a transformers `model_type`."""
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the polysense reader that follows names the problem
    return isinstance(data, dict) and "model_type" in data


# ---------------------------------------------------------------------------------------------
# the tokenizer


class HFChatTokenizer:
    """A transformers tokenizer with its chat template, in the interface of `ChatTokenizer`."""

    def __init__(self, *, tokenizer: Any) -> None:
        self._tok = tokenizer
        if IMAGE not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if tokenizer.eos_token_id is None:
            raise PolysenseError(
                f"the {type(tokenizer).__name__} tokenizer has no eos token: generation would "
                "never stop; use a tokenizer whose tokenizer_config.json names eos_token"
            )
        self.image_id = int(tokenizer.convert_tokens_to_ids(IMAGE))
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.stop_ids: tuple[int, ...] = (self.eos_id,)

    @property
    def hf(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFChatTokenizer:
        from polysense.data.tokenizer import _auto_tokenizer

        return cls(tokenizer=_auto_tokenizer(Path(directory)))

    def save_dir(self, directory: str | Path) -> None:
        """The tokenizer's own files (`save_pretrained`, chat template included), each moved
        into `directory` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as tmp:
            self._tok.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                os.replace(file, directory / file.name)

    def render(self, msgs: list[dict[str, str]], *, generation: bool) -> str:
        return self._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    def text_chat(self, turns: Sequence[tuple[str, str]]) -> str:
        """A conversation without an image through the chat template: an LM's pretraining text
        (`data.instruct.world_texts`)."""
        return self.render(messages(turns, None, image=False), generation=False)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def prompt_ids(self, prompt: str) -> list[int]:
        """A `ChatPrompt` through the chat template (ending in the assistant's cue); any other
        string is taken as the full prompt text, with the tokenizer's own special tokens."""
        if isinstance(prompt, ChatPrompt):
            return self.encode(
                self.render(messages(prompt.turns, prompt.question), generation=True)
            )
        return list(self._tok(prompt)["input_ids"])

    def _spans(
        self, turns: Sequence[tuple[str, str]], *, image: bool = True
    ) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered conversation and per answer (start, end of its text, end of its turn) in
        characters. The template must render each conversation as a prefix of its extension."""
        full = self.render(messages(turns, None, image=image), generation=False)
        spans = []
        for k in range(len(turns)):
            msgs = messages(turns[: k + 1], None, image=image)
            before = self.render(msgs[:-1], generation=True)
            upto = self.render(msgs, generation=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise PolysenseError(
                    "the tokenizer's chat template does not render a conversation as a prefix of "
                    "its continuation, so answer tokens cannot be located; use another template"
                )
            text_end = upto.find(turns[k][1], len(before))
            text_end = len(upto) if text_end < 0 else text_end + len(turns[k][1])
            spans.append((len(before), text_end, len(upto)))
        return full, spans

    def _flags(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        enc = self._tok(full, add_special_tokens=False, return_offsets_mapping=True)
        flags = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), flags

    def conversation_ids(
        self, turns: Sequence[tuple[str, str]], *, image: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a flag per token: True on the answers' tokens and the
        template's end of each assistant turn (what the model learns to say). With `image`, the
        first user turn holds `<image>`."""
        full, spans = self._spans(turns, image=image)
        return self._flags(full, [(a, c) for a, _, c in spans])

    def scored_row(self, prompt: str, response: str, *, eos: bool) -> tuple[list[int], int]:
        """(ids of prompt + response, number of prompt tokens) for `VLM.score`."""
        if not isinstance(prompt, ChatPrompt):
            p = self.prompt_ids(prompt)
            r = self.encode(" " + response) + ([self.eos_id] if eos else [])
            return p + r, len(p)
        full, spans = self._spans([*prompt.turns, (prompt.question, response)])
        a, b, c = spans[-1]
        ids, flags = self._flags(full[: c if eos else b], [(a, c if eos else b)])
        return ids, flags.index(True) if True in flags else len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True).strip()

    def add_stops(self, generation_config: Any) -> None:
        """Also stop at the LM's generation_config eos ids (Llama-3 / Qwen chat models end a turn
        with a token other than the tokenizer's eos)."""
        eos = getattr(generation_config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop_ids = tuple(dict.fromkeys([*self.stop_ids, *map(int, eos)]))


# ---------------------------------------------------------------------------------------------
# the language model


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the interface of `models.lm.GPT`."""

    def __init__(self, *, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def token_embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(
        self,
        embeds: torch.Tensor,
        key_mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """embeds (B, T, C) of the new tokens, key_mask (B, S) over past + new (True = real) ->
        logits (B, T, V) and the per-layer (k, v) cache extended by these T tokens."""
        from transformers import DynamicCache

        t, s = embeds.shape[1], key_mask.shape[1]
        pos = positions_from_mask(key_mask)[:, s - t :]  # (B, T)
        past = None
        want_cache = cache is not None or not torch.is_grad_enabled()
        if cache is not None:
            past = DynamicCache(config=self.model.config)
            for i, (k, v) in enumerate(cache):
                past.update(k, v, i)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=key_mask.long(),
            position_ids=pos,
            cache=past,
            use_cache=want_cache,
        )
        new = [(layer.keys, layer.values) for layer in out.cache.layers] if want_cache else []
        return out.logits, new


def causal_lm_class(config: Any, where: Path) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise PolysenseError(
            f"{where}/config.json: model_type={config.model_type!r} has no AutoModelForCausalLM "
            "class in transformers; init.lm needs a causal LM directory (Llama, Qwen2, GPT-2, ...)"
        ) from None


def lm_config_fields(config: Any) -> dict[str, int]:
    """The polysense `LMConfig` fields describing an HF LM config (read by the projector and the
    decoder's banned ids)."""
    return {
        "vocab_size": config.vocab_size,
        "context_length": getattr(config, "max_position_embeddings", 0) or 2048,
        "width": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
    }


def load_hf_lm(src: str | Path) -> tuple[HFCausalLM, HFChatTokenizer]:
    """An `AutoModelForCausalLM` directory (with its tokenizer files) -> (LM, tokenizer); the
    embeddings grow when `<image>` had to be added to the tokenizer."""
    from transformers import AutoConfig

    src = Path(src)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(src), local_files_only=True)
            model = _load_hf(causal_lm_class(config, src), src)
    except (OSError, ValueError) as exc:
        raise PolysenseError(f"{src}: transformers could not load it ({exc})") from None
    tokenizer = HFChatTokenizer.from_dir(src)
    tokenizer.add_stops(model.generation_config)
    if tokenizer.vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer.vocab_size)
    return HFCausalLM(model=model), tokenizer


def lm_from_config_dir(directory: Path) -> HFCausalLM:
    """A fresh LM of the architecture (and generation config) saved in `directory`; its
    weights come from elsewhere."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    with quiet_transformers():
        model = causal_lm_class(config, directory)(config)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return HFCausalLM(model=model)


# ---------------------------------------------------------------------------------------------
# LLaVA both ways


def _vision_pairs(v: VisionConfig, family: str) -> list[tuple[list[str], list[str]]]:
    """(HF vision tower keys, polysense `visual.*` keys), from models.hf's table."""

    cfg = ModelConfig(family=family, vision=v, text=TextConfig(layers=0))
    out = []
    for hf_keys, ours in key_pairs(cfg):
        if ours[0].startswith("visual.") and ".head." not in ours[0]:
            out.append(([k.removeprefix("vision_model.") for k in hf_keys], ours))
    return out


def _lm_key_map(lm: Any) -> dict[str, str]:
    """Causal-LM state dict key -> LLaVA key (the base model under model.language_model)."""
    prefix = lm.base_model_prefix + "."
    return {
        k: ("model.language_model." + k.removeprefix(prefix)) if k.startswith(prefix) else k
        for k in lm.state_dict()
    }


def _check_llava(model: Any) -> None:
    cfg, v = model.cfg, model.cfg.vision
    want = {
        "model.decoder": (cfg.decoder, "hf", "set init.lm to an HF causal LM directory"),
        "model.projector": (cfg.projector, "mlp2x", "LLaVA's projector is Linear-GELU-Linear"),
        "model.vision.stem": (v.stem, "patch", "HF CLIP/SigLIP have only a patch embedding"),
    }
    wrong = [f"{k}={have!r} ({fix})" for k, (have, need, fix) in want.items() if have != need]
    if _tower_family(v) is None:
        wrong.append(
            f"model.vision.pool={v.pool!r} with ln_pre={v.ln_pre} is neither an HF CLIP (cls, "
            "ln_pre) nor a SigLIP (no cls, no ln_pre) vision tower"
        )
    if cfg.feature_layer == -1:
        wrong.append(
            "model.feature_layer=-1 (polysense's -1 includes the final LayerNorm, LLaVA's "
            "hidden_states[-1] does not; train with model.feature_layer=-2, LLaVA's default)"
        )
    if wrong:
        raise PolysenseError("this VLM cannot be written as LLaVA: " + "; ".join(wrong))


def _tower_family(v: VisionConfig) -> str | None:
    """'clip' or 'siglip': the HF vision model a polysense tower is, for LLaVA."""
    if v.pool == "cls" and v.ln_pre and not v.patch_bias:
        return "clip"
    if v.pool in ("map", "mean") and not v.ln_pre:
        return "siglip"
    return None


def export_llava(model: Any, out_dir: str | Path) -> Path:
    """Write a polysense VLM as a `LlavaForConditionalGeneration` directory (config.json,
    model.safetensors, generation_config.json) with its `LlavaProcessor` (tokenizer files, chat
    template, preprocessor_config.json, processor_config.json). The first tile embedding, which
    polysense adds to every image token before the projector, is folded into the projector's
    first bias (the same function); images are not tiled in LLaVA."""
    import transformers

    _check_llava(model)
    cfg, v, tok = model.cfg, model.cfg.vision, model.tokenizer
    lm = model.lm.model
    text_config = lm.config
    family = _tower_family(v)
    cls = family == "clip"
    # LLaVA's "default" drops the first token: only for a tower that has a cls token
    strategy = "default" if cls and cfg.feature_select == "patch" else "full"
    n_tokens = (v.image_size // v.patch_size) ** 2 + (cls and strategy == "full")
    if cls:
        vision_config = transformers.CLIPVisionConfig(**hf_vision_fields(v))
    else:
        vision_config = transformers.SiglipVisionConfig(
            **hf_vision_fields(v), vision_use_head=False
        )
    hf_cfg = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config.to_dict(),
        image_token_index=tok.image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=n_tokens,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with quiet_transformers():
        hf = transformers.LlavaForConditionalGeneration(hf_cfg)
    shapes = {k: x.shape for k, x in hf.state_dict().items()}
    ours = {
        k.removeprefix("visual."): x
        for k, x in model.visual.state_dict().items()
        if not k.startswith("head.")  # SigLIP's pooling head: the VLM does not read it
    }
    vis_pairs = [
        (["model.vision_tower." + k for k in h], [o.removeprefix("visual.") for o in our])
        for h, our in _vision_pairs(v, family)
    ]
    if family == "siglip" and not v.patch_bias:
        ours["patch_embed.bias"] = torch.zeros(v.width)  # HF SigLIP always has one
    state = convert(ours, shapes, vis_pairs, to_hf=True)
    lin1, lin2 = model.projector[0], model.projector[2]
    state["model.multi_modal_projector.linear_1.weight"] = lin1.weight.detach().clone()
    bias = lin1.bias.detach() + lin1.weight.detach() @ model.tile_embed[0].detach()
    state["model.multi_modal_projector.linear_1.bias"] = bias.clone()
    state["model.multi_modal_projector.linear_2.weight"] = lin2.weight.detach().clone()
    state["model.multi_modal_projector.linear_2.bias"] = lin2.bias.detach().clone()
    for src, dst in _lm_key_map(lm).items():
        state[dst] = lm.state_dict()[src].detach().clone()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (hf_cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PolysenseError(f"LLaVA export: weights left unmapped {(missing + unexpected)[:4]}")
    hf.generation_config.eos_token_id = list(tok.stop_ids)
    hf.generation_config.pad_token_id = tok.pad_id

    out = Path(out_dir)
    with files_into(out, prefix=".export.") as tmp, quiet_transformers():
        hf.save_pretrained(tmp)
        _write_preprocessor(tmp, v)
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(tmp))
        processor = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok.hf,
            patch_size=v.patch_size,
            vision_feature_select_strategy=hf_cfg.vision_feature_select_strategy,
            chat_template=tok.hf.chat_template,
            image_token=IMAGE,
            num_additional_image_tokens=1 if cls else 0,
        )
        processor.save_pretrained(str(tmp))
    return out


def import_llava(src_dir: str | Path) -> Any:
    """A `LlavaForConditionalGeneration` directory (CLIP vision tower, any causal LM, GELU
    projector) -> a polysense VLM (eval mode) with the directory's tokenizer and chat template."""
    import transformers

    src = Path(src_dir)
    with quiet_transformers():
        hf = _load_hf(transformers.LlavaForConditionalGeneration, src)
    c, vc = hf.config, hf.config.vision_config
    where = f"{src}/config.json"
    problems = []
    families = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
    family = families.get(vc.model_type)
    if family is None:
        problems.append(f"vision_config.model_type={vc.model_type!r} (only {sorted(families)})")
    if c.projector_hidden_act != "gelu" or not c.multimodal_projector_bias:
        problems.append(f"projector_hidden_act={c.projector_hidden_act!r} (only gelu, with bias)")
    if not isinstance(c.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={c.vision_feature_layer} (only one layer)")
    elif c.vision_feature_layer in (-1, vc.num_hidden_layers):
        problems.append("vision_feature_layer=-1 (polysense's -1 includes post_layernorm)")
    if problems:
        raise PolysenseError(f"{where}: " + "; ".join(problems))
    # SigLIP's attention-pooling head is not read: the VLM takes the patch tokens
    vision = vision_config_from_hf(vc, src, family, pool="cls" if family == "clip" else "mean")
    tc = c.text_config
    with quiet_transformers():
        lm_model = causal_lm_class(tc, src)(tc)
    lm = HFCausalLM(model=lm_model)
    tokenizer = HFChatTokenizer.from_dir(src)
    layer = c.vision_feature_layer
    cfg = VLMConfig(
        lm=LMConfig(**lm_config_fields(tc)),
        vision=vision,
        projector="mlp2x",
        max_tiles=1,
        decoder="hf",
        feature_layer=layer if layer < 0 else layer - vc.num_hidden_layers - 1,
        feature_select="patch" if c.vision_feature_select_strategy == "default" else "full",
    )
    if family == "siglip" and cfg.feature_select == "patch":
        raise PolysenseError(
            f"{where}: vision_feature_select_strategy='default' drops the first patch of a "
            "SigLIP tower (it has no cls token); polysense cannot express that"
        )
    model = VLM(cfg=cfg, tokenizer=tokenizer, lm=lm)
    hf_state = hf.state_dict()
    ours_shapes = {k.removeprefix("visual."): x.shape for k, x in model.visual.state_dict().items()}
    vis_pairs = [
        (["model.vision_tower." + k for k in h], [o.removeprefix("visual.") for o in our])
        for h, our in _vision_pairs(vision, family)
    ]
    vis_src = {
        k: x
        for k, x in hf_state.items()
        if k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.head.")
    }
    model.visual.load_state_dict(convert(vis_src, ours_shapes, vis_pairs, to_hf=False))
    p = "model.multi_modal_projector."
    model.projector[0].load_state_dict(
        {"weight": hf_state[p + "linear_1.weight"], "bias": hf_state[p + "linear_1.bias"]}
    )
    model.projector[2].load_state_dict(
        {"weight": hf_state[p + "linear_2.weight"], "bias": hf_state[p + "linear_2.bias"]}
    )
    lm_state = {}
    for ours, theirs in _lm_key_map(lm_model).items():
        if theirs in hf_state:
            lm_state[ours] = hf_state[theirs]
    lm_model.load_state_dict(lm_state, strict=not getattr(tc, "tie_word_embeddings", False))
    if getattr(tc, "tie_word_embeddings", False):
        lm_model.tie_weights()
    model.run_cfg = VLMRunConfig(name=f"hf-{src.resolve().name}", model=model.cfg)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# LoRA on the decoder (through peft)

LORA_ADAPTER = "default"


def add_lora(lm: nn.Module, *, rank: int, alpha: float, dropout: float, targets: str) -> list[str]:
    """Inject peft LoRA adapters (rank `rank`, scale alpha / rank) into the decoder's linear
    layers named by `targets` (comma-separated module-name suffixes; "" = peft's default for the
    HF model type, `attn.qkv` for polysense's GPT). B starts at zero, so the function is
    unchanged until training. Returns the targeted module names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    except ImportError:
        raise PolysenseError(
            "train.lora_rank > 0 needs peft: pip install 'polysense[lora]'"
        ) from None
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        model_type = getattr(getattr(lm, "model", None), "config", None)
        model_type = getattr(model_type, "model_type", None)
        names = list(DEFAULTS.get(model_type, [])) if model_type else ["attn.qkv"]
        if not names:
            raise PolysenseError(
                f"peft has no default LoRA targets for model_type={model_type!r}; "
                "--set train.lora_targets=q_proj,v_proj (module names of the LM)"
            )
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    inject_adapter_in_model(cfg, lm, adapter_name=LORA_ADAPTER)
    hit = [n for n, m in lm.named_modules() if hasattr(m, "lora_A")]
    if not hit:
        raise PolysenseError(f"train.lora_targets={targets!r} matches no linear layer of the LM")
    return hit


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `module` with every LoRA layer folded into its base weight (W + BA *
    alpha / r, by peft's `get_delta_weight`) and the adapter tensors left out: the checkpoint a
    model without LoRA loads."""
    state = module.state_dict()
    lora = {n: m for n, m in module.named_modules() if hasattr(m, "lora_A")}
    if not lora:
        return state
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    with torch.no_grad():
        for name, m in lora.items():
            key = f"{name}.weight"
            out[key] = out[key] + m.get_delta_weight(LORA_ADAPTER).to(out[key].dtype)
    return out

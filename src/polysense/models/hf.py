"""Hugging Face interoperability: `CLIPModel` / `SiglipModel` directories <-> polysense `CLIP`.

`import_hf` reads an HF directory (config.json + weights), derives the polysense config from HF's
(widths, layers, heads, patch, activation, LayerNorm eps, pooling, projections) and maps every
weight by name. `export_hf` does the reverse and writes a directory that
`transformers.CLIPModel.from_pretrained` (family "clip") or `SiglipModel.from_pretrained`
(family "siglip") loads, with `tokenizer.json` and a `preprocessor_config.json` that reproduces
`polysense.data.transforms.images_to_tensor`.

Both directions share one table of (HF keys, polysense keys) pairs: the tensors of one side,
flattened and concatenated, equal those of the other (q/k/v projections are fused in polysense;
SigLIP's MAP head fuses them in HF), reshaped to each side's shapes.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from polysense.config import ModelConfig, RunConfig, TextConfig, VisionConfig
from polysense.data.tokenizer import HF_TOKENIZER_FILES, Tokenizer
from polysense.data.transforms import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from polysense.errors import PolysenseError
from polysense.fileio import files_into
from polysense.models.clip import CLIP
from polysense.models.text import TextTransformer, quiet_transformers
from polysense.models.vit import ACTIVATIONS, mlp_dim

# HF activation names polysense computes identically (gelu_new is the same tanh approximation).
_ACT_ALIASES = {"gelu_new": "gelu_pytorch_tanh"}

Pairs = list[tuple[list[str], list[str]]]


def _block_pairs(hf: str, ours: str, layers: int) -> Pairs:
    pairs: Pairs = []
    for i in range(layers):
        h, o = f"{hf}.encoder.layers.{i}", f"{ours}.blocks.{i}"
        for p in ("weight", "bias"):
            qkv = [f"{h}.self_attn.{n}_proj.{p}" for n in "qkv"]
            pairs += [
                (qkv, [f"{o}.attn.qkv.{p}"]),
                ([f"{h}.self_attn.out_proj.{p}"], [f"{o}.attn.proj.{p}"]),
                ([f"{h}.layer_norm1.{p}"], [f"{o}.ln_1.{p}"]),
                ([f"{h}.layer_norm2.{p}"], [f"{o}.ln_2.{p}"]),
                ([f"{h}.mlp.fc1.{p}"], [f"{o}.mlp.fc1.{p}"]),
                ([f"{h}.mlp.fc2.{p}"], [f"{o}.mlp.fc2.{p}"]),
            ]
    return pairs


def _wb(hf: str, ours: str) -> Pairs:
    return [([f"{hf}.weight"], [f"{ours}.weight"]), ([f"{hf}.bias"], [f"{ours}.bias"])]


def key_pairs(cfg: ModelConfig) -> Pairs:
    """(HF keys, polysense keys) for every tensor of a model that HF CLIP/SigLIP can express."""
    v, t = "vision_model", "text_model"
    pairs: Pairs = [
        ([f"{v}.embeddings.patch_embedding.weight"], ["visual.patch_embed.weight"]),
        ([f"{v}.embeddings.position_embedding.weight"], ["visual.pos_embed"]),
        *_block_pairs(v, "visual", cfg.vision.layers),
        *_wb(f"{v}.post_layernorm", "visual.ln_post"),
        ([f"{t}.embeddings.token_embedding.weight"], ["text.token_embed.weight"]),
        ([f"{t}.embeddings.position_embedding.weight"], ["text.pos_embed"]),
        *_block_pairs(t, "text", cfg.text.layers),
        *_wb(f"{t}.final_layer_norm", "text.ln_final"),
        (["logit_scale"], ["logit_scale"]),
    ]
    if cfg.family == "clip":
        pairs += [
            ([f"{v}.embeddings.class_embedding"], ["visual.cls_token"]),
            *_wb(f"{v}.pre_layrnorm", "visual.ln_pre"),
            (["visual_projection.weight"], ["image_proj.weight"]),
            (["text_projection.weight"], ["text_proj.weight"]),
        ]
    else:
        head = f"{v}.head"
        pairs += [
            ([f"{v}.embeddings.patch_embedding.bias"], ["visual.patch_embed.bias"]),
            ([f"{head}.probe"], ["visual.head.probe"]),
            (
                [f"{head}.attention.in_proj_weight"],
                ["visual.head.q.weight", "visual.head.kv.weight"],
            ),
            ([f"{head}.attention.in_proj_bias"], ["visual.head.q.bias", "visual.head.kv.bias"]),
            *_wb(f"{head}.attention.out_proj", "visual.head.proj"),
            *_wb(f"{head}.layernorm", "visual.head.norm"),
            *_wb(f"{head}.mlp.fc1", "visual.head.mlp.fc1"),
            *_wb(f"{head}.mlp.fc2", "visual.head.mlp.fc2"),
            *_wb(f"{t}.head", "text_proj"),
            (["logit_bias"], ["logit_bias"]),
        ]
    return pairs


def convert(
    src: dict[str, torch.Tensor], shapes: dict[str, torch.Size], pairs: Pairs, *, to_hf: bool
) -> dict[str, torch.Tensor]:
    """Map a state dict across the key table; `shapes` are the destination's tensor shapes."""
    out: dict[str, torch.Tensor] = {}
    for hf_keys, our_keys in pairs:
        src_keys, dst_keys = (our_keys, hf_keys) if to_hf else (hf_keys, our_keys)
        missing = [k for k in src_keys if k not in src]
        if missing:
            raise PolysenseError(f"weights lack {missing}; the file does not match its config")
        flat = torch.cat([src[k].detach().reshape(-1) for k in src_keys])
        sizes = [math.prod(shapes[k]) for k in dst_keys]
        if sum(sizes) != flat.numel():
            raise PolysenseError(
                f"{src_keys} hold {flat.numel()} values but {dst_keys} need {sum(sizes)}; "
                "the weights do not match their config"
            )
        for k, part in zip(dst_keys, flat.split(sizes), strict=True):
            out[k] = part.reshape(shapes[k]).clone()
    unused = set(src) - {k for pair in pairs for k in (pair[1] if to_hf else pair[0])}
    if unused:
        raise PolysenseError(f"no mapping for weights {sorted(unused)[:5]}: unsupported variant")
    return out


def _act(name: str, where: str) -> str:
    name = _ACT_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise PolysenseError(f"{where}: hidden_act={name!r} is not supported ({list(ACTIVATIONS)})")
    return name


def _image_processing(src: Path, family: str, image_size: int) -> dict[str, Any]:
    """The VisionConfig fields (resize, image_mean, image_std) that reproduce the directory's
    `preprocessor_config.json` (CLIPImageProcessor: shorter side + centre crop; SiglipImage-
    Processor: both sides), or the family's defaults without one. A processor polysense cannot
    reproduce exactly is an error that names the field, not a silent approximation."""
    path = src / "preprocessor_config.json"
    clip = family == "clip"
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else (SIGLIP_MEAN, SIGLIP_STD)
    resize = "shortest_edge" if clip else "square"
    if path.is_file():
        data = json.loads(path.read_text())
        data = data.get("image_processor", data)  # a processor_config.json nests it
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
        size = data.get("size", {})
        size = {"shortest_edge": size} if isinstance(size, int) else size
        crop = data.get("crop_size", {})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        cropped = data.get("do_center_crop", clip)
        wanted = {"height": image_size, "width": image_size}
        if "shortest_edge" in size and cropped:
            resize = "shortest_edge"
            ok = size["shortest_edge"] == image_size and {**wanted, **crop} == wanted
        elif {"height", "width"} <= set(size) and not cropped:
            resize = "square"
            ok = {k: size[k] for k in ("height", "width")} == wanted
        else:
            ok = False
        problems = [] if ok else [f"size={size}, crop_size={crop}, do_center_crop={cropped}"]
        if data.get("resample", 3) != 3:
            problems.append(f"resample={data['resample']} (only 3, bicubic, is reproduced)")
        if abs(float(data.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            problems.append(f"rescale_factor={data['rescale_factor']} (only 1/255)")
        if not data.get("do_rescale", True) or not data.get("do_normalize", True):
            problems.append("do_rescale/do_normalize false")
        if problems:
            raise PolysenseError(
                f"{path}: {'; '.join(problems)}: polysense reproduces a bicubic resize of the "
                f"shorter side to {image_size} + centre crop, or of both sides to {image_size}, "
                "then x 1/255 and normalisation; fix the file or preprocess images yourself and "
                "pass tensors"
            )
    return {
        "resize": resize,
        "image_mean": tuple(float(x) for x in mean),
        "image_std": tuple(float(x) for x in std),
    }


def vision_config_from_hf(vc: Any, src: Path, family: str, *, pool: str) -> VisionConfig:
    """The polysense `VisionConfig` of an HF CLIP/SigLIP `vision_config` in directory `src`
    (its preprocessor_config.json gives the resize and normalisation), pooled by `pool`."""
    clip = family == "clip"
    return VisionConfig(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        in_channels=vc.num_channels,
        width=vc.hidden_size,
        layers=vc.num_hidden_layers,
        heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size,
        pool=pool,
        ln_eps=vc.layer_norm_eps,
        act=_act(vc.hidden_act, f"{src}/config.json vision_config"),
        ln_pre=clip,
        patch_bias=not clip,
        **_image_processing(src, family, vc.image_size),
    )


def _config_from_hf(hf: Any, src: Path) -> ModelConfig:
    """The polysense `ModelConfig` of an HF `CLIPModel` / `SiglipModel`."""
    c, vc, tc = hf.config, hf.config.vision_config, hf.config.text_config
    family = "clip" if c.model_type == "clip" else "siglip"
    clip = family == "clip"
    if not clip and not vc.vision_use_head:
        raise PolysenseError(f"{src}/config.json: vision_use_head=false is not supported")
    vision = vision_config_from_hf(vc, src, family, pool="cls" if clip else "map")
    # HF CLIP pools at the first eos token, or at the highest id when eos_token_id == 2 (configs
    # from before transformers PR #24773): polysense's eot_id=-1. SigLIP pools the last position.
    eos = tc.eos_token_id if tc.eos_token_id is not None else -1
    text = TextConfig(
        vocab_size=tc.vocab_size,
        context_length=tc.max_position_embeddings,
        width=tc.hidden_size,
        layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads,
        mlp_ratio=tc.intermediate_size / tc.hidden_size,
        causal=clip,
        pool="eot" if clip else "last",
        ln_eps=tc.layer_norm_eps,
        act=_act(tc.hidden_act, f"{src}/config.json text_config"),
        mask_padding=False,  # HF's get_text_features attends to every position it is given
        pad_id=tc.pad_token_id if tc.pad_token_id is not None else 0,
        eot_id=-1 if eos == 2 else eos,
    )
    scale = float(hf.logit_scale.detach().reshape(()))
    max_scale = max(math.log(100.0), scale)  # never clamp an imported temperature
    if clip:
        return ModelConfig(
            family="clip",
            embed_dim=c.projection_dim,
            vision=vision,
            text=text,
            init_logit_scale=float(c.logit_scale_init_value),
            max_logit_scale=max_scale,
        )
    if tc.projection_size != vc.hidden_size:
        raise PolysenseError(
            f"{src}/config.json: text projection_size={tc.projection_size} differs from the "
            f"vision hidden_size={vc.hidden_size}; such a SigLIP cannot compare its embeddings"
        )
    return ModelConfig(
        family="siglip",
        embed_dim=vc.hidden_size,
        vision=vision,
        text=text,
        init_logit_scale=scale,
        max_logit_scale=max_scale,
        init_logit_bias=float(hf.logit_bias.detach().reshape(())),
        vision_proj="none",
        text_proj="linear_bias",
    )


def _hf_class(model_type: str, where: Path) -> type:
    import transformers

    classes = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}
    if model_type not in classes:
        raise PolysenseError(
            f"{where}: model_type={model_type!r} is not supported; import-hf reads "
            f"{sorted(classes)} (CLIPModel, SiglipModel)"
        )
    return classes[model_type]


def _load_hf(cls: type, src: Path) -> Any:
    """The HF model at `src`. safetensors weights load through transformers, told to use them
    only; PyTorch `.bin` weights are read here with torch's restricted unpickler
    (`weights_only=True`: tensors and plain values), whatever transformers' own default, so a
    crafted .bin cannot run code, and a damaged one is a one-line error."""
    bins = sorted(src.glob("pytorch_model*.bin"))  # one file, or its shards
    safe = any(src.glob("model*.safetensors"))
    if safe or not bins:
        return cls.from_pretrained(str(src), local_files_only=True, use_safetensors=safe or None)
    model = cls(cls.config_class.from_pretrained(str(src), local_files_only=True))
    state: dict[str, torch.Tensor] = {}
    fix = "re-download it, or convert it to model.safetensors"
    for path in bins:
        try:
            part = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise PolysenseError(
                f"{path}: refused by torch's restricted unpickler (weights_only=True): damaged, "
                f"or holding objects other than tensors; {fix}"
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise PolysenseError(f"{path}: not a PyTorch weights file ({detail}); {fix}") from None
        if not isinstance(part, dict):
            raise PolysenseError(f"{path} holds a {type(part).__name__}, not a state dict")
        state |= part
    try:
        missing, _ = model.load_state_dict(state, strict=False)  # extra: legacy position_ids
    except RuntimeError as exc:  # a tensor of another shape
        missing = [str(exc).splitlines()[-1].strip()[:160]]
    if missing:
        raise PolysenseError(
            f"{src}: the .bin weights do not fit its config.json ({missing[0]}, "
            f"{len(missing)} in all); {fix}"
        )
    return model.eval()


def import_hf(src_dir: str | Path) -> tuple[CLIP, RunConfig]:
    """Load an HF `CLIPModel`/`SiglipModel` directory as a polysense `CLIP` (eval mode) and the
    `RunConfig` that describes it. Its tokenizer (the directory's own files, read by
    transformers: CLIP BPE, WordPiece, SigLIP SentencePiece) comes along; a directory without one
    gives a model whose text must be passed as ids (a warning says so)."""
    src = Path(src_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise PolysenseError(f"{cfg_path} does not exist: {src} is not a Hugging Face model dir")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    cls = _hf_class(model_type, cfg_path)
    try:
        with quiet_transformers():
            hf = _load_hf(cls, src)
    except (OSError, ValueError) as exc:
        raise PolysenseError(f"{src}: transformers could not load it ({exc})") from None
    cfg = _config_from_hf(hf, src)
    tokenizer = None
    if any((src / f).is_file() for f in HF_TOKENIZER_FILES):
        try:
            tokenizer = Tokenizer.from_file(src, context_length=cfg.text.context_length)
        except PolysenseError as exc:
            warnings.warn(f"{src}: its tokenizer not used ({exc}); give text as ids", stacklevel=2)
    else:
        warnings.warn(
            f"{src} has no tokenizer ({', '.join(HF_TOKENIZER_FILES)}); give text to this model "
            "as ids",
            stacklevel=2,
        )
    model = CLIP(cfg=cfg, tokenizer=tokenizer)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(convert(hf.state_dict(), shapes, key_pairs(cfg), to_hf=False))
    run_cfg = RunConfig(name=f"hf-{src.resolve().name}", model=model.cfg)
    return model.eval(), run_cfg


def _check_exportable(model: CLIP) -> None:
    cfg, v, t = model.cfg, model.cfg.vision, model.cfg.text
    if not isinstance(model.text, TextTransformer):
        raise PolysenseError(
            f"model.text.pretrained={t.pretrained!r}: the MiniLM (BERT) text tower has no "
            "CLIPModel/SiglipModel equivalent; export-hf needs a polysense text transformer"
        )
    if v.stem != "patch":
        raise PolysenseError(
            f"model.vision.stem={v.stem!r}: HF CLIPModel/SiglipModel have only a patch "
            "embedding; export-hf needs a model trained with model.vision.stem=patch"
        )
    if cfg.family == "clip":
        want = {
            "model.vision.pool": (v.pool, "cls"),
            "model.vision.ln_pre": (v.ln_pre, True),
            "model.vision.patch_bias": (v.patch_bias, False),
            "model.text.causal": (t.causal, True),
            "model.text.pool": (t.pool, "eot"),
            "model.vision_proj": (cfg.vision_proj, "linear"),
            "model.text_proj": (cfg.text_proj, "linear"),
        }
    else:
        want = {
            "model.vision.pool": (v.pool, "map"),
            "model.vision.ln_pre": (v.ln_pre, False),
            "model.text.causal": (t.causal, False),
            "model.text.pool": (t.pool, "last"),
            "model.text.mask_padding": (t.mask_padding, False),
            "model.vision_proj": (cfg.vision_proj, "none"),
        }
    wrong = [
        f"{k}={have!r} (HF needs {need!r})" for k, (have, need) in want.items() if have != need
    ]
    if wrong:
        raise PolysenseError(
            f"this {cfg.family} model cannot be written as an HF "
            f"{'CLIPModel' if cfg.family == 'clip' else 'SiglipModel'}: " + "; ".join(wrong)
        )


def _remap_token_ids(data: Any, swap: dict[int, int]) -> Any:
    """Swap token ids inside a tokenizer.json dict: vocab, added tokens, post-processor ids."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key == "vocab" and isinstance(value, dict):
                out[key] = {tok: swap.get(i, i) for tok, i in value.items()}
            elif key == "id" and isinstance(value, int):
                out[key] = swap.get(value, value)
            elif key == "ids" and isinstance(value, list):
                out[key] = [swap.get(i, i) for i in value]
            else:
                out[key] = _remap_token_ids(value, swap)
        return out
    if isinstance(data, list):
        return [_remap_token_ids(x, swap) for x in data]
    return data


def _token_text(tok_json: dict, token_id: int) -> str | None:
    for added in tok_json.get("added_tokens", []):
        if added["id"] == token_id:
            return added["content"]
    return None


def hf_vision_fields(v: VisionConfig) -> dict[str, Any]:
    """The HF CLIP/SigLIP `vision_config` fields of a polysense vision tower."""
    return {
        "layer_norm_eps": v.ln_eps,
        "hidden_size": v.width,
        "intermediate_size": mlp_dim(v.width, v.mlp_ratio),
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_channels": v.in_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.act,
    }


def export_hf(model: CLIP, run_cfg: RunConfig, out_dir: str | Path) -> Path:
    """Write `model` as an HF `CLIPModel` (family "clip") or `SiglipModel` directory.

    Files: config.json, model.safetensors (via `save_pretrained`), the tokenizer's own files
    (`save_pretrained`: tokenizer_config.json with tokenizer.json or spiece.model) and
    preprocessor_config.json, each moved into `out_dir` atomically.
    HF CLIP treats `eos_token_id == 2` as "pool at the highest id"; when polysense's eot id is 2
    (our BPE's [EOS]), eot and bos swap ids in the exported embedding and tokenizer.json.
    `run_cfg` names the run in the exported config; the architecture comes from `model.cfg`.
    """
    import transformers

    _check_exportable(model)
    cfg, v, t = model.cfg, model.cfg.vision, model.cfg.text
    state = {k: x.detach().cpu() for k, x in model.state_dict().items()}
    tok_json = None  # set when the tokenizer's ids must change (the swap below)
    eos, bos = t.eot_id, (model.tokenizer.bos_id if model.tokenizer is not None else None)
    if cfg.family == "clip" and eos == 2:
        if model.tokenizer is None:
            raise PolysenseError(
                "eot id 2 means 'highest id' to HF CLIP; exporting it needs the model's "
                "tokenizer to move eot to another id, and this model has none"
            )
        tok_json = model.tokenizer.to_json()
        if tok_json is None or bos is None:
            raise PolysenseError(
                "eot id 2 means 'highest id' to HF CLIP; exporting it moves eot to the start "
                "token's id, and this model's tokenizer has no tokenizer.json or no start token"
            )
        swap = {2: bos, bos: 2}
        emb = state["text.token_embed.weight"].clone()
        emb[[2, bos]] = emb[[bos, 2]]
        state["text.token_embed.weight"] = emb
        tok_json = _remap_token_ids(tok_json, swap)
        eos, bos = bos, 2
    elif eos == -1:
        eos = 2  # the OpenAI rule (argmax of ids) is what HF does for eos_token_id == 2

    vision_cfg = hf_vision_fields(v)
    text_cfg = {
        "layer_norm_eps": t.ln_eps,
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": mlp_dim(t.width, t.mlp_ratio),
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": t.act,
        "pad_token_id": t.pad_id,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if cfg.family == "clip":
        hf_cfg = transformers.CLIPConfig(
            text_config=text_cfg,
            vision_config=vision_cfg,
            projection_dim=cfg.embed_dim,
            logit_scale_init_value=cfg.init_logit_scale,
        )
        hf_cls = transformers.CLIPModel
    else:
        text_cfg["projection_size"] = cfg.embed_dim
        hf_cfg = transformers.SiglipConfig(text_config=text_cfg, vision_config=vision_cfg)
        hf_cls = transformers.SiglipModel
        if not v.patch_bias:  # HF SigLIP always has one: zero is the same function
            state["visual.patch_embed.bias"] = torch.zeros(v.width)
        if cfg.text_proj == "linear":
            state["text_proj.bias"] = torch.zeros(cfg.embed_dim)
        if model.logit_bias is None:
            state["logit_bias"] = torch.zeros(())
    with quiet_transformers():
        hf = hf_cls(hf_cfg)
    shapes = {k: x.shape for k, x in hf.state_dict().items()}
    hf.load_state_dict(convert(state, shapes, key_pairs(cfg), to_hf=True))
    hf.config.name_or_path = run_cfg.name

    out = Path(out_dir)
    with files_into(out, prefix=".export.") as tmp:
        with quiet_transformers():
            hf.save_pretrained(tmp)
        _write_preprocessor(tmp, v)
        if model.tokenizer is not None and tok_json is None:  # the tokenizer's own files
            model.tokenizer.hf.model_max_length = t.context_length
            model.tokenizer.save_dir(tmp)
        elif tok_json is not None:  # ids swapped: a tokenizer.json with its config
            (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
            special = {
                name: _token_text(tok_json, i)
                for name, i in (("pad_token", t.pad_id), ("bos_token", bos), ("eos_token", eos))
            }
            tok_cfg = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": t.context_length,
                **{k: s for k, s in special.items() if s is not None},
            }
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out


def _write_preprocessor(directory: Path, v: VisionConfig) -> None:
    """The transformers image processor config equal to `images_to_tensor` with `v.resize`:
    CLIPImageProcessor (bicubic shorter side + centre crop) or SiglipImageProcessor (bicubic,
    both sides)."""
    common = {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
    }
    if v.resize == "square":
        data = {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": v.image_size, "width": v.image_size},
            **common,
        }
    else:
        data = {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": v.image_size},
            "do_center_crop": True,
            "crop_size": {"height": v.image_size, "width": v.image_size},
            **common,
        }
    (directory / "preprocessor_config.json").write_text(json.dumps(data, indent=2))


__all__ = [
    "convert",
    "export_hf",
    "import_hf",
    "key_pairs",
]

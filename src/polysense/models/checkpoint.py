"""Checkpoint directories of every family: write them, read them back, tell them apart.

One directory per model, each file written atomically (`polysense.fileio`), `config.json` last
(its presence marks a complete checkpoint); weights are safetensors, nothing is unpickled.

| family | config.json | other files |
| --- | --- | --- |
| CLIP / SigLIP / towers | `RunConfig` | model.safetensors, the tokenizer's files |
| fusion | `{"family": "fusion", **FusionRunConfig}` | model.safetensors, tokenizer.json |
| LM / VLM | `LMRunConfig` / `VLMRunConfig` | model.safetensors, tokenizer.json (an HF decoder: the tokenizer's own files and lm/config.json) |
| t2i | the run config, `model` a `DiffusionConfig` | model.safetensors (U-Net), text/ (a CLIP checkpoint) |

`load_checkpoint` reads any of them (and Hugging Face CLIP/SigLIP/LLaVA directories, through
models/hf.py and models/vlm_hf.py), dispatching on `model_family`; `polysense.load` adds preset
names. `export_checkpoint` / `import_to_checkpoint` are `polysense export-hf` / `import-hf`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polysense.config import ConfigError, RunConfig, dumps, from_dict, to_dict
from polysense.data.chat import ChatTokenizer
from polysense.data.tokenizer import HF_TOKENIZER_FILES, Tokenizer
from polysense.errors import PolysenseError
from polysense.fileio import atomic_path, atomic_write_json, atomic_write_text, files_into
from polysense.models.clip import CLIP
from polysense.models.diffusion import DiffusionConfig, TextCondition, TextToImage, UNet
from polysense.models.fusion import FusionModel, FusionRunConfig, fusion_model
from polysense.models.hf import export_hf, import_hf
from polysense.models.lm import GPT, LMConfig
from polysense.models.text import quiet_transformers
from polysense.models.vlm import VLM, LMRunConfig, VLMRunConfig
from polysense.models.vlm_hf import (
    LM_DIR,
    HFCausalLM,
    HFChatTokenizer,
    export_llava,
    import_llava,
    is_hf_dir,
    lm_config_fields,
    lm_from_config_dir,
    load_hf_lm,
    merged_state_dict,
)

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
UNET_FILE, TEXT_DIR = WEIGHTS_FILE, "text"  # t2i: the U-Net's weights; the text tower's checkpoint


# ---------------------------------------------------------------------------------------------
# contrastive models (CLIP, SigLIP, audio/video towers)


def save_checkpoint(model: CLIP, run_cfg: RunConfig, ckpt_dir: str | Path) -> Path:
    """Write `config.json`, `model.safetensors` and `tokenizer.json` into `ckpt_dir`, each
    atomically; config.json goes last, so its presence marks a complete checkpoint.

    The saved config is `run_cfg` with `model` replaced by `model.cfg` (which carries the
    tokenizer's pad/eot ids)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(ckpt_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if model.tokenizer is not None:  # its Hugging Face files: tokenizer.json or spiece.model, ...
        model.tokenizer.save_dir(ckpt_dir)
    cfg = dataclasses.replace(run_cfg, model=model.cfg)
    atomic_write_text(ckpt_dir / CONFIG_FILE, dumps(cfg) + "\n")
    return ckpt_dir


def _config_json(ckpt_dir: str | Path, *, missing: str) -> tuple[Path, dict[str, Any]]:
    """(path, parsed) of a checkpoint's config.json; a missing or damaged file is a one-line
    error naming it (`missing` says what is not there and how to make it)."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise PolysenseError(f"{path} does not exist: {ckpt_dir} is not {missing}")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolysenseError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None


def read_run_config(ckpt_dir: str | Path) -> RunConfig:
    """The `RunConfig` of a checkpoint directory, with errors that name the file."""
    path, data = _config_json(
        ckpt_dir,
        missing="a polysense checkpoint directory (train one with `polysense train`, or import "
        "HF weights with `polysense import-hf`)",
    )
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise PolysenseError(f"{path}: {exc}") from None


def load_model(path: str | Path, *, device: str = "cpu") -> CLIP:
    """A contrastive checkpoint directory (CLIP, SigLIP, audio/video towers) or a Hugging Face
    CLIPModel/SiglipModel directory (imported on the fly) -> the model, in eval mode. A preset
    name's random init is `polysense.load(NAME)`."""
    path = Path(path)
    if not path.is_dir():
        raise PolysenseError(
            f"{path} is not a checkpoint directory (train one with `polysense train`, import HF "
            "weights with `polysense import-hf`; a preset's random init: polysense.load(NAME))"
        )
    cfg_path = path / CONFIG_FILE
    if is_hf_dir(path):
        return import_hf(path)[0].to(device).eval()
    run = read_run_config(path)
    text = run.model.text
    if any((path / f).is_file() for f in HF_TOKENIZER_FILES):
        tokenizer = Tokenizer.from_file(path, context_length=text.context_length)
    elif text.pretrained == "minilm":
        tokenizer = Tokenizer.minilm(context_length=text.context_length)
    else:
        tokenizer = None
    model = CLIP(cfg=run.model, tokenizer=tokenizer, inference_precision=run.train.precision)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise PolysenseError(f"{weights} does not exist: the checkpoint in {path} is incomplete")
    try:
        model.load_state_dict(load_file(weights, device="cpu"))
    except RuntimeError as exc:
        raise PolysenseError(
            f"{weights} does not match {cfg_path}: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(device).eval()


def tower_weights(ckpt_dir: str | Path, prefix: str, *, field: str) -> dict[str, torch.Tensor]:
    """The tensors of a contrastive checkpoint's tower, `prefix` ("visual.", "text.") stripped:
    what initialises another model's tower. `field` is the config field that names the
    checkpoint (for the error)."""
    path = Path(ckpt_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise PolysenseError(
            f"{field}: {path} does not exist; point it at a CLIP checkpoint directory such as "
            "runs/quickstart/ckpt (train one with `polysense quickstart`)"
        )
    return {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# fusion


def save_fusion(model: FusionModel, cfg: FusionRunConfig, tokenizer: Tokenizer, out: Path) -> None:
    """config.json (last: its presence marks a complete checkpoint), weights, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    tokenizer.save(out / "tokenizer.json")
    text = json.dumps({"family": "fusion", **dataclasses.asdict(cfg)}, indent=2)
    atomic_write_text(out / "config.json", text + "\n")


def load_fusion(ckpt: str | Path) -> tuple[FusionModel, Tokenizer, FusionRunConfig]:
    """A fusion checkpoint directory -> (model in eval mode, tokenizer, run config)."""
    ckpt = Path(ckpt)
    path = ckpt / "config.json"
    if not path.is_file():
        raise PolysenseError(
            f"{path} does not exist: train a fusion model first "
            f"(polysense train fusion-early-tiny --data runs/world-all --out {ckpt})"
        )
    data = json.loads(path.read_text())
    if data.pop("family", None) != "fusion":
        raise PolysenseError(f"{path}: field 'family' is not 'fusion'; not a fusion checkpoint")
    train = data.get("train", {})
    if "max_seconds" in train:  # checkpoints before the one training loop named the budget so
        train["max_minutes"] = train.pop("max_seconds") / 60
    cfg = from_dict(FusionRunConfig, data)
    tokenizer = Tokenizer.from_file(
        ckpt / "tokenizer.json", context_length=cfg.model.context_length
    )
    # the weights come from the checkpoint: no need for the init checkpoints to still exist
    model = fusion_model(dataclasses.replace(cfg.model, image_init="", text_init=""))
    try:
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
    except RuntimeError as exc:
        raise PolysenseError(
            f"{ckpt / 'model.safetensors'} does not fit the fusion model its config.json "
            f"describes ({str(exc).splitlines()[-1].strip()}); a checkpoint from an older "
            "polysense (xattn before pos_media) has to be retrained"
        ) from None
    return model.eval(), tokenizer, cfg


# ---------------------------------------------------------------------------------------------
# language models and VLMs


def _write(module: nn.Module, cfg: Any, tokenizer: Any, ckpt_dir: Path) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in merged_state_dict(module).items():  # LoRA folded in: a plain model loads it
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen:  # tied weights (an HF LM's head): safetensors wants copies
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    with atomic_path(ckpt_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if isinstance(tokenizer, HFChatTokenizer):  # its own files, chat template included
        tokenizer.save_dir(ckpt_dir)
        module.lm.model.config.save_pretrained(ckpt_dir / LM_DIR)
        module.lm.model.generation_config.save_pretrained(ckpt_dir / LM_DIR)
    else:
        tokenizer.save(ckpt_dir / TOKENIZER_FILE)
    atomic_write_text(ckpt_dir / CONFIG_FILE, dumps(cfg) + "\n")  # last: marks it complete
    return ckpt_dir


def save_hf_lm(lm: HFCausalLM, tokenizer: HFChatTokenizer, ckpt_dir: str | Path) -> Path:
    """An LM stage's Hugging Face decoder as a plain transformers directory (`save_pretrained`
    of the model and the tokenizer, each file moved in whole): `AutoModelForCausalLM` and
    `init.lm` of the VLM stages read it."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with files_into(ckpt_dir, prefix=".hf-lm.") as tmp, quiet_transformers():
        lm.model.save_pretrained(tmp)
        tokenizer.hf.save_pretrained(tmp)
    return ckpt_dir


def save_vlm(
    model: VLM | GPT,
    cfg: VLMRunConfig | LMRunConfig,
    tokenizer: ChatTokenizer | HFChatTokenizer,
    ckpt_dir: str | Path,
) -> Path:
    """Write config.json, model.safetensors and tokenizer.json (each atomically); with an HF
    decoder, the tokenizer's own files and the LM's architecture in lm/config.json instead."""
    return _write(model, cfg, tokenizer, Path(ckpt_dir))


def read_config(ckpt_dir: str | Path) -> VLMRunConfig | LMRunConfig:
    """The LM or VLM run config of a checkpoint directory, with errors that name the file."""
    path, data = _config_json(
        ckpt_dir,
        missing="a checkpoint directory (train one with `polysense train vlm-tiny-stage2 "
        "--data runs/world-all --out DIR`)",
    )
    family = data.get("model", {}).get("family")
    if family not in ("lm", "vlm"):
        raise PolysenseError(
            f"{path}: model.family is {family!r}, not a language model ('lm') or VLM ('vlm'); "
            "pass the checkpoint of `polysense train lm-tiny` or `vlm-tiny-stage1/2`"
        )
    try:
        return from_dict(LMRunConfig if family == "lm" else VLMRunConfig, data)
    except ConfigError as exc:
        raise PolysenseError(f"{path}: {exc}") from None


def model_family(ckpt_dir: str | Path) -> str:
    """A checkpoint directory's family from its config.json alone (no weights read): 'clip' or
    'siglip' (contrastive models, audio/video towers included, and Hugging Face CLIPModel /
    SiglipModel directories), 'lm', 'vlm' (LLaVA directories too), 'fusion' or 't2i'; '' when
    config.json names none of them."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise PolysenseError(f"{path} does not exist: {ckpt_dir} is not a checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolysenseError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        return ""
    if "model_type" in data:  # a Hugging Face directory
        archs = data.get("architectures") or []
        if any(str(a).endswith("ForCausalLM") for a in archs):
            return "lm"
        return {"llava": "vlm", "clip": "clip", "siglip": "siglip"}.get(data["model_type"], "")
    if data.get("family") == "fusion":
        return "fusion"
    model = data.get("model", {})
    if not isinstance(model, dict):
        return ""
    if "timesteps" in model:  # a DiffusionConfig
        return "t2i"
    return str(model.get("family", ""))


def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt_dir / WEIGHTS_FILE
    if not path.is_file():
        raise PolysenseError(f"{path} does not exist: the checkpoint in {ckpt_dir} is incomplete")
    return load_file(path, device="cpu")


def load_lm(
    ckpt_dir: str | Path,
) -> tuple[GPT | HFCausalLM, ChatTokenizer | HFChatTokenizer, LMRunConfig]:
    """An lm-tiny checkpoint -> (GPT, tokenizer, run config), in eval mode. A Hugging Face
    causal LM directory (`decoder=qwen2` writes one) gives the transformers model behind the
    GPT's interface, its tokenizer, and a run config describing its sizes."""
    ckpt_dir = Path(ckpt_dir)
    if is_hf_dir(ckpt_dir):
        lm, tok = load_hf_lm(ckpt_dir)
        config = lm.model.config
        sizes = LMConfig(**lm_config_fields(config))
        return lm.eval(), tok, LMRunConfig(decoder=config.model_type, model=sizes)
    cfg = read_config(ckpt_dir)
    if not isinstance(cfg, LMRunConfig):
        raise PolysenseError(f"{ckpt_dir} holds a VLM, not a language model; use load_vlm")
    model = GPT(cfg=cfg.model)
    model.load_state_dict(_weights(ckpt_dir))
    return model.eval(), ChatTokenizer.from_file(ckpt_dir / TOKENIZER_FILE), cfg


def load_vlm(ckpt_dir: str | Path, *, device: str = "cpu") -> VLM:
    """A VLM checkpoint directory, or a Hugging Face LLaVA directory (`vlm_hf.import_llava`) ->
    the model (with `.run_cfg`), in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    if is_hf_dir(ckpt_dir):
        model_type = json.loads((ckpt_dir / CONFIG_FILE).read_text())["model_type"]
        if model_type != "llava":
            raise PolysenseError(
                f"{ckpt_dir / CONFIG_FILE}: model_type={model_type!r} is not a VLM; pass a "
                "polysense VLM checkpoint or a LlavaForConditionalGeneration directory"
            )
        return import_llava(ckpt_dir).to(device)
    cfg = read_config(ckpt_dir)
    if not isinstance(cfg, VLMRunConfig):
        raise PolysenseError(
            f"{ckpt_dir} holds a text-only language model (lm-tiny); captioning and VQA need a "
            "VLM checkpoint from `polysense train vlm-tiny-stage1` or `vlm-tiny-stage2`"
        )
    if cfg.model.decoder == "hf":
        tokenizer: Any = HFChatTokenizer.from_dir(ckpt_dir)
        lm = lm_from_config_dir(ckpt_dir / LM_DIR)
        tokenizer.add_stops(lm.model.generation_config)
        if tokenizer.vocab_size > lm.token_embed.num_embeddings:
            lm.model.resize_token_embeddings(tokenizer.vocab_size)
        model = VLM(cfg=cfg.model, tokenizer=tokenizer, lm=lm)
    else:
        tokenizer = ChatTokenizer.from_file(ckpt_dir / TOKENIZER_FILE)
        model = VLM(cfg=cfg.model, tokenizer=tokenizer)
    try:
        model.load_state_dict(_weights(ckpt_dir))
    except RuntimeError as exc:
        raise PolysenseError(
            f"{ckpt_dir / WEIGHTS_FILE} does not match its config: {str(exc).splitlines()[0]}"
        ) from None
    model.run_cfg = cfg
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# text-to-image


def save_generator(model: TextToImage, run_cfg: object, ckpt_dir: Path) -> Path:
    """Write the inference checkpoint: `text/` (the frozen tower's CLIP checkpoint, so the
    directory is self-contained), `model.safetensors` (U-Net) and, last, `config.json`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clip = model.text.clip
    if not (ckpt_dir / TEXT_DIR / "config.json").is_file():
        save_checkpoint(clip, clip_run_config(clip), ckpt_dir / TEXT_DIR)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}
    with atomic_path(ckpt_dir / UNET_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(ckpt_dir / "config.json", to_dict(run_cfg))
    return ckpt_dir


def clip_run_config(clip: CLIP) -> RunConfig:
    """A RunConfig carrying a loaded CLIP's model config (what `save_checkpoint` records)."""
    return RunConfig(model=clip.cfg)


def load_generator(ckpt_dir: str | Path, *, device: str = "cpu") -> TextToImage:
    """A directory written by `polysense train t2i-...` -> TextToImage in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    if not cfg_path.is_file() or not (ckpt_dir / UNET_FILE).is_file():
        raise PolysenseError(
            f"{ckpt_dir} is not a text-to-image checkpoint (no config.json + {UNET_FILE}); "
            "train one with `polysense train t2i-tiny --data runs/world --out DIR`"
        )
    data = json.loads(cfg_path.read_text())
    if "model" not in data or "timesteps" not in data.get("model", {}):
        raise PolysenseError(
            f"{cfg_path}: field 'model' is not a diffusion config; is {ckpt_dir} a CLIP "
            "checkpoint? pass the directory written by `polysense train t2i-tiny`"
        )
    try:
        cfg = from_dict(DiffusionConfig, data["model"])
    except ConfigError as exc:
        raise PolysenseError(f"{cfg_path}: model: {exc}") from None
    text = TextCondition(clip=load_model(ckpt_dir / TEXT_DIR, device=device))
    unet = UNet(cfg=cfg)
    try:
        unet.load_state_dict(load_file(ckpt_dir / UNET_FILE, device="cpu"))
    except RuntimeError as exc:
        raise PolysenseError(
            f"{ckpt_dir / UNET_FILE} does not match {cfg_path}: {str(exc).splitlines()[0]}"
        ) from None
    return TextToImage(unet=unet, text=text).to(device).eval()


# ---------------------------------------------------------------------------------------------
# any family; Hugging Face directories both ways

FAMILIES = ("clip", "siglip", "fusion", "lm", "vlm", "t2i")


def load_checkpoint(ckpt_dir: str | Path, *, device: str = "cpu") -> nn.Module:
    """Any checkpoint directory -> its model in eval mode, read by its family's loader
    (`model_family`): `CLIP` (CLIP, SigLIP, towers; HF CLIPModel/SiglipModel directories too),
    `FusionModel`, `GPT`, `VLM` (LLaVA directories too) or `TextToImage`. The fusion model and
    the GPT carry their `tokenizer` and `run_cfg` as attributes, as the VLM does."""
    family = model_family(ckpt_dir)
    if family in ("clip", "siglip"):
        return load_model(ckpt_dir, device=device)
    if family == "vlm":
        return load_vlm(ckpt_dir, device=device)
    if family == "t2i":
        return load_generator(ckpt_dir, device=device)
    if family in ("lm", "fusion"):
        model, tokenizer, cfg = (load_lm if family == "lm" else load_fusion)(ckpt_dir)
        model.tokenizer, model.run_cfg = tokenizer, cfg
        return model.to(device)
    raise PolysenseError(
        f"{Path(ckpt_dir) / CONFIG_FILE}: names no model family polysense reads "
        f"({', '.join(FAMILIES)}); pass a directory written by `polysense train` or "
        "`polysense import-hf`, or a Hugging Face CLIP/SigLIP/LLaVA directory"
    )


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """`polysense export-hf CKPT --out DIR`: a polysense checkpoint directory -> HF directory
    (a VLM checkpoint -> a LLaVA directory, `models.vlm_hf.export_llava`)."""
    if Path(ckpt_dir, CONFIG_FILE).is_file() and model_family(ckpt_dir) == "vlm":
        return export_llava(load_vlm(ckpt_dir), out_dir)
    return export_hf(load_model(ckpt_dir), read_run_config(ckpt_dir), out_dir)


def import_to_checkpoint(src_dir: str | Path, out_dir: str | Path) -> Path:
    """`polysense import-hf SRC --out DIR`: an HF directory -> polysense checkpoint directory
    (a LLaVA directory -> a VLM checkpoint, `models.vlm_hf.import_llava`)."""
    cfg_path = Path(src_dir) / "config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("model_type") == "llava":
        vlm = import_llava(src_dir)
        return save_vlm(vlm, vlm.run_cfg, vlm.tokenizer, out_dir)
    model, run_cfg = import_hf(src_dir)
    return save_checkpoint(model, run_cfg, out_dir)

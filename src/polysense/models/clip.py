"""The dual-tower contrastive model (CLIP / SigLIP, and audio/video towers).

`CLIP` = image tower + text tower + a projection of each into a shared `embed_dim` space, plus the
learned temperature (`logit_scale`, in log space) and, for SigLIP, a learned `logit_bias`. The loss
lives in `polysense.losses`; the model only produces L2-normalised embeddings. Its checkpoints are
written and read by `polysense.models.checkpoint` (`save_checkpoint`, `load_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from polysense.config import ModelConfig, RunConfig
from polysense.data.tokenizer import Tokenizer
from polysense.data.transforms import images_to_tensor
from polysense.errors import PolysenseError
from polysense.models.packed import (
    folded_copy,
    folds,
    packed_copy,
    packing_available,
    worth_packing,
)
from polysense.models.text import build_text_tower
from polysense.models.vit import VisionTransformer
from polysense.precision import Precision, resolve_precision


def _projection(kind: str, width: int, embed_dim: int, field: str) -> nn.Module:
    if kind == "none":
        if width != embed_dim:
            raise PolysenseError(
                f"model.{field}='none' needs the tower width ({width}) to equal "
                f"model.embed_dim ({embed_dim}); change one, or use 'linear'"
            )
        return nn.Identity()
    proj = nn.Linear(width, embed_dim, bias=kind == "linear_bias")
    nn.init.normal_(proj.weight, std=width**-0.5)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    return proj


def _sync_with_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
    """Check the tokenizer fits the text tower and copy its pad/eot ids into the text config."""
    if tokenizer is None:
        return cfg
    text = cfg.text
    if tokenizer.vocab_size > text.vocab_size:
        raise PolysenseError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size="
            f"{text.vocab_size}; --set model.text.vocab_size={tokenizer.vocab_size}"
        )
    if tokenizer.context_length > text.context_length:
        raise PolysenseError(
            f"the tokenizer's context_length={tokenizer.context_length} exceeds "
            f"model.text.context_length={text.context_length}; make them equal"
        )
    eot_id = text.eot_id if text.eot_id == -1 else tokenizer.eot_id
    text = dataclasses.replace(text, pad_id=tokenizer.pad_id, eot_id=eot_id)
    return dataclasses.replace(cfg, text=text)


TOWERS = ("image", "text", "audio", "video")


def _bf16_copy(module: nn.Module) -> nn.Module:
    """A bf16 copy of `module` for inference (`CLIP._inference_modules`)."""
    return copy.deepcopy(module).to(torch.bfloat16).requires_grad_(False)


def _check_towers(cfg: ModelConfig) -> None:
    towers = tuple(cfg.towers)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or len(set(towers)) != len(towers) or len(towers) < 2:
        raise PolysenseError(
            f"model.towers={','.join(towers)}: give two or more distinct towers out of "
            f"{', '.join(TOWERS)}, e.g. --set model.towers=image,text,audio"
        )
    if len(towers) > 2 and cfg.anchor not in towers:
        raise PolysenseError(
            f"model.anchor={cfg.anchor!r} is not one of model.towers ({', '.join(towers)}); "
            "the anchor is the tower every other one is aligned with"
        )


class CLIP(nn.Module):
    """Image and text towers projected to a shared, L2-normalised embedding space.

    `tokenizer` turns strings into ids for `encode_text`; it may be None for a model whose text
    must be given as ids (an HF import without a readable tokenizer). The tokenizer's pad and eot
    ids are copied into `cfg.text` so that pooling finds the right positions.

    `inference_precision` ("auto", "fp32", "bf16") is the format `encode_image` / `encode_text`
    compute in when gradients are off and no autocast is active: "auto" is bf16 on hardware with
    bf16 matrix units (`polysense.precision`). `load_model` sets it to the checkpoint's
    `train.precision`, so a model infers in the format it was trained in; the embeddings are
    float32 either way.

    `inference_packed` runs float32 inference on CPU through a copy of the towers on MKL-packed
    weights (`models/packed.py`; the copy shares the parameters, its packed weights take about
    as much memory again): "auto" (the default) for towers of ViT-B size and up, where it is
    measured faster (`packed.worth_packing`; docs/performance.md), True for any size, False
    never (saves that memory). Without MKL (ARM, macOS) or on a GPU the copy keeps the plain
    linears and only runs OpenAI CLIP's quick-GELU MLPs folded into one in-place SiLU.

    `inference_compile` (default False) runs those inference towers through `torch.compile`
    (inductor), compiled at their first call with each input shape (seconds to a minute) and
    reused after; the weights stay inputs of the compiled graph, so a later optimizer step or
    load is seen. Measured at ViT-B/32 in fp32 on 2 AVX2 threads: 1.24x the unpacked eager
    path, no faster than the packed one (it replaces it; docs/performance.md).
    """

    def __init__(
        self,
        *,
        cfg: ModelConfig,
        tokenizer: Tokenizer | None,
        inference_precision: Precision = "fp32",
    ) -> None:
        super().__init__()
        _check_towers(cfg)
        self.inference_precision = inference_precision
        self.inference_compile = False
        self.inference_packed: bool | Literal["auto"] = "auto"
        if "text" in cfg.towers:
            cfg = _sync_with_tokenizer(cfg, tokenizer)
        self.cfg = cfg
        self.tokenizer = tokenizer
        towers = cfg.towers
        # Construction order (and so the seeded initialisation) of an image-text model is unchanged.
        if "image" in towers:
            self.visual = VisionTransformer(cfg=cfg.vision)
        if "text" in towers:
            self.text = build_text_tower(cfg.text)
        if "image" in towers:
            self.image_proj = _projection(
                cfg.vision_proj, self.visual.width, cfg.embed_dim, "vision_proj"
            )
        if "text" in towers:
            self.text_proj = _projection(cfg.text_proj, self.text.width, cfg.embed_dim, "text_proj")
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))
        if "audio" in towers:
            from polysense.models.audio import AudioTransformer

            self.audio = AudioTransformer(cfg=cfg.audio)
            self.audio_proj = _projection(
                cfg.audio_proj, cfg.audio.width, cfg.embed_dim, "audio_proj"
            )
        if "video" in towers:
            from polysense.models.video import VideoTransformer

            self.video = VideoTransformer(cfg=cfg.video)
            self.video_proj = _projection(
                cfg.video_proj, cfg.video.width, cfg.embed_dim, "video_proj"
            )

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def towers(self) -> dict[str, nn.Module]:
        """Modality -> its encoder, for the towers this model has."""
        names = {"image": "visual", "text": "text", "audio": "audio", "video": "video"}
        return {m: getattr(self, names[m]) for m in self.cfg.towers}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers().values():
            tower.set_grad_checkpointing(enable)

    def clamped_logit_scale(self) -> torch.Tensor:
        """log of the temperature multiplier, clamped at `max_logit_scale` (ln 100 by default)."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise PolysenseError(
                "this model has no tokenizer (e.g. imported from a Hugging Face directory "
                "without a tokenizer.json polysense can read); pass token ids (B, L) instead "
                "of strings"
            )
        return self.tokenizer(list(texts))

    def encode_image(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """Images -> (B, D) unit vectors. A tensor must be (B, 3, H, W), already normalised."""
        if not isinstance(images, torch.Tensor):
            images = self.preprocess(images)
        visual, proj = self._inference_modules("visual", "image_proj")
        x = proj(visual(images.to(self.device)))  # (B, D)
        return F.normalize(x.float(), dim=-1)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the (B, 3, H, W) normalised tensor `encode_image` takes (resize, centre
        crop, normalise with the tower's mean/std); `encode_image(preprocess(x))` equals
        `encode_image(x)`, so a caller can preprocess in worker threads and keep only tensors."""
        v = self.cfg.vision
        return images_to_tensor(
            list(images), size=v.image_size, mean=v.image_mean, std=v.image_std, resize=v.resize
        )

    def encode_text(self, ids: torch.Tensor | Sequence[str] | str) -> torch.Tensor:
        """Token ids (B, L) or strings -> (B, D) unit vectors."""
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, torch.Tensor):
            ids = self.tokenize(ids)
        text, proj = self._inference_modules("text", "text_proj")
        x = proj(text(ids.to(self.device)))  # (B, D)
        return F.normalize(x.float(), dim=-1)

    def _inference_modules(self, *names: str) -> tuple[nn.Module, ...]:
        """The submodules `names`, or inference copies of them when gradients are off (training
        keeps its own modules) and no autocast is active (a caller's own choice stands):

        - bf16 copies when `inference_precision` resolves to bf16 on the model's device: running
          bf16 weights directly, instead of autocast casting every weight on every call,
          measured 1.08x (clip-tiny) to 1.14x (clip-small) faster on one core;
        - float32 copies on packed weights (`models/packed.py`) on a CPU with MKL, when
          `inference_packed` is True, or "auto" and the modules are large enough to gain from it
          (`worth_packing`), and `inference_compile` is off; elsewhere (no MKL, a GPU) under the
          same conditions, copies whose quick-GELU MLPs run folded (`folded_copy`).

        The copies are made once and reused while the weights stay the same (same storage and
        version counter of every parameter; an optimizer step or a load bumps them)."""
        mods = tuple(getattr(self, n) for n in names)
        dev = self.device
        if torch.is_grad_enabled() or torch.is_autocast_enabled(dev.type):
            return mods
        if resolve_precision(self.inference_precision, dev) == "bf16":
            kind, make = "bf16", _bf16_copy
        elif not self.inference_compile and (kind := self._fp32_copy_kind(names, mods)):
            make = packed_copy if kind == "packed" else folded_copy
        else:
            return self._compiled(names, mods)
        # Weights loaded under inference_mode are inference tensors, which keep no version
        # counter (they cannot be updated outside inference_mode): their storage is the key.
        key = tuple(
            (p.data_ptr(), -1 if p.is_inference() else p._version)
            for m in mods
            for p in m.parameters()
        )
        cache = self.__dict__.setdefault("_inference_copies", {})  # not submodules: no state_dict
        if (kind, names) not in cache or cache[kind, names][0] != key:
            cache[kind, names] = (key, tuple(make(m) for m in mods))
        copies = cache[kind, names][1]
        for m, c in zip(mods, copies, strict=True):
            if c.training != m.training:  # train() walks every submodule: only on a change
                c.train(m.training)
        return copies if kind != "bf16" else self._compiled(("bf16", *names), copies)

    def _fp32_copy_kind(self, names: tuple[str, ...], mods: tuple[nn.Module, ...]) -> str | None:
        """The float32 inference copy `mods` get: "packed" (a CPU with MKL), "folded" (elsewhere,
        quick-GELU MLPs only) or None, by `inference_packed` and, under "auto", `worth_packing`.
        Decided once per module set, device and setting (the checks walk the modules)."""
        cache = self.__dict__.setdefault("_fp32_copy_kinds", {})  # not state
        device, packed = self.device.type, self.inference_packed
        token = (tuple(id(m) for m in mods), device, packed)
        if names not in cache or cache[names][0] != token:
            kind = None
            if packed is True or (packed == "auto" and worth_packing(*mods)):
                if device == "cpu" and packing_available():
                    kind = "packed"
                elif folds(*mods):  # no MKL (ARM, macOS) or a GPU: the quick-GELU fold alone
                    kind = "folded"
            cache[names] = (token, kind)
        return cache[names][1]

    def _compiled(self, key: tuple[str, ...], mods: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
        """`mods` through `torch.compile` when `inference_compile` is on (one wrapper per module,
        kept while the module is the same object), else `mods` as they are."""
        if not self.inference_compile:
            return mods
        cache = self.__dict__.setdefault("_compiled_towers", {})  # not submodules: no state_dict
        if key not in cache or any(
            w._orig_mod is not m for w, m in zip(cache[key], mods, strict=True)
        ):
            cache[key] = tuple(torch.compile(m) for m in mods)
        return cache[key]

    def encode_audio(
        self, waves: torch.Tensor | Sequence[Any], *, sample_rate: int | None = None
    ) -> torch.Tensor:
        """Waveforms -> (B, D) unit vectors. A tensor must be (B, S) at `cfg.audio.sample_rate`;
        a list of 1-D arrays at `sample_rate` (default the model's) is resampled and cropped."""
        self._need("audio")
        if not isinstance(waves, torch.Tensor):
            from polysense.models.audio import waves_to_tensor

            rate = sample_rate or self.cfg.audio.sample_rate
            waves = waves_to_tensor(list(waves), [rate] * len(waves), self.cfg.audio)
        elif sample_rate not in (None, self.cfg.audio.sample_rate):
            raise PolysenseError(
                f"audio at {sample_rate} Hz given as a tensor; the model takes "
                f"{self.cfg.audio.sample_rate} Hz: pass a list of arrays to resample them"
            )
        x = self.audio_proj(self.audio(waves.to(self.device)))  # (B, D)
        return F.normalize(x, dim=-1)

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Clips -> (B, D) unit vectors: uint8 (B, T', H, W, 3) (frames sampled uniformly to
        `cfg.video.num_frames`, then normalised) or normalised float (B, T, 3, H, W)."""
        self._need("video")
        if videos.dtype == torch.uint8:
            from polysense.models.video import sample_frame_indices, videos_to_tensor

            idx = sample_frame_indices(videos.shape[1], self.cfg.video.num_frames)
            videos = videos_to_tensor(videos[:, torch.from_numpy(idx)], self.cfg.video)
        x = self.video_proj(self.video(videos.to(self.device)))  # (B, D)
        return F.normalize(x, dim=-1)

    def encode(self, modality: str, x: Any) -> torch.Tensor:
        """(B, D) unit embeddings of one modality: image, text, audio or video."""
        fn = {
            "image": self.encode_image,
            "text": self.encode_text,
            "audio": self.encode_audio,
            "video": self.encode_video,
        }
        if modality not in fn:
            raise PolysenseError(f"unknown modality {modality!r}; use one of {list(fn)}")
        return fn[modality](x)

    def _need(self, modality: str) -> None:
        if modality not in self.cfg.towers:
            raise PolysenseError(
                f"this model has no {modality} tower (towers: {', '.join(self.cfg.towers)}); "
                f"train a preset with one, e.g. `polysense train av-tiny`"
            )

    def forward(
        self,
        images: torch.Tensor | Sequence[Image.Image] | None = None,
        ids: torch.Tensor | Sequence[str] | None = None,
        *,
        inputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Both embeddings plus `logit_scale`, the multiplier exp(clamped log scale) (not its
        log), and `logit_bias` (None for CLIP). With `inputs` ({modality: batch}) instead:
        `{"embeds": {modality: (B, D)}, "logit_scale", "logit_bias"}` for any set of towers."""
        if inputs is not None:
            return {
                "embeds": {m: self.encode(m, x) for m, x in inputs.items()},
                "logit_scale": self.clamped_logit_scale().exp(),
                "logit_bias": self.logit_bias,
            }
        return {
            "image_embeds": self.encode_image(images),  # (B, D)
            "text_embeds": self.encode_text(ids),  # (B', D)
            "logit_scale": self.clamped_logit_scale().exp(),  # ()
            "logit_bias": self.logit_bias,  # () or None
        }


# Captions for the BPE tokenizer of a preset loaded without data: the vocabulary of the world's
# scenes (colours, shapes, sizes, relations, counts). Training on real data builds its own.
_COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "pink",
    "cyan",
    "brown",
]
_SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring"]
_SIZES = ["small", "large", "big", "tiny", "medium"]
_RELATIONS = ["left of", "right of", "above", "below", "next to"]
_COUNTS = ["one", "two", "three", "no"]


def bootstrap_captions() -> list[str]:
    """A deterministic caption list used to train a tokenizer when no dataset is given."""
    out = [f"a {s} {c} {sh}" for s, c, sh in itertools.product(_SIZES, _COLOURS, _SHAPES)]
    for (c1, s1), rel, (c2, s2) in itertools.product(
        zip(_COLOURS, _SHAPES * 2, strict=False),
        _RELATIONS,
        zip(_COLOURS[::-1], _SHAPES, strict=False),
    ):
        out.append(f"a {c1} {s1} {rel} a {c2} {s2}")
    out += [
        f"{n} {c} {sh}s in the picture"
        for n, c, sh in itertools.product(_COUNTS, _COLOURS, _SHAPES)
    ]
    out += [f"is there a {c} {sh}? yes" for c, sh in itertools.product(_COLOURS, _SHAPES)]
    return out


def build_model(run_cfg: RunConfig, *, texts: Iterable[str] | None = None) -> CLIP:
    """A randomly initialised CLIP with its tokenizer: MiniLM's for `pretrained="minilm"`, else a
    BPE trained on `texts` (a dataset's captions), or on `bootstrap_captions()` when None."""
    text = run_cfg.model.text
    if text.pretrained == "minilm":
        tokenizer = Tokenizer.minilm(context_length=text.context_length)
    else:
        corpus = list(texts) if texts is not None else bootstrap_captions()
        tokenizer = Tokenizer.train(
            corpus, vocab_size=text.vocab_size, context_length=text.context_length
        )
    return CLIP(cfg=run_cfg.model, tokenizer=tokenizer)

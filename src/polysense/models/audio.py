"""Audio tower: a log-mel spectrogram front-end in torch and an AST-style patch transformer.

`MelSpectrogram` is librosa's `melspectrogram` + `power_to_db` (Hann window, centred frames with
zero padding, power 2, Slaney mel scale and area normalisation, 10 log10 with a 1e-10 floor),
written in torch so it runs on the model's device and inside autocast; tests check it against
librosa and an independent numpy formula. `AudioTransformer` is the Audio Spectrogram Transformer
(Gong et al., 2021) in small: the (mel, time) image is cut into patches by one conv, a cls token
and learned positions are added, and the pre-norm blocks of `models/vit.py` run over the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from torch import nn

from polysense.config import AudioConfig
from polysense.data.readers import fit_clip, resample_audio
from polysense.errors import PolysenseError
from polysense.models.vit import init_linear, make_blocks, run_blocks


def hz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = freq / f_sp
    log = min_log_mel + torch.log(freq.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(freq >= min_log_hz, log, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(
        mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel
    )


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float = 0.0
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, each scaled to unit area (Slaney norm)."""
    f_max = f_max or sample_rate / 2
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise PolysenseError(
            f"mel filterbank: need 0 <= f_min ({f_min}) < f_max ({f_max}) <= sample_rate / 2 "
            f"({sample_rate / 2}); fix model.audio.f_min / f_max"
        )
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    mels = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz = mel_to_hz(mels)  # (M + 2,) band edges
    widths = hz.diff()  # (M + 1,)
    ramps = hz[:, None] - fft_freqs[None, :]  # (M + 2, F)
    lower = -ramps[:-2] / widths[:-1, None]  # rising edge
    upper = ramps[2:] / widths[1:, None]  # falling edge
    weights = torch.clamp(torch.minimum(lower, upper), min=0)  # (M, F)
    weights *= (2.0 / (hz[2:] - hz[:-2]))[:, None]  # equal area per filter
    return weights.float()


class MelSpectrogram(nn.Module):
    """Waveforms (B, S) -> log-mel power in dB (B, n_mels, 1 + S // hop_length)."""

    def __init__(
        self,
        *,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min: float = 0.0,
        f_max: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        window = torch.hann_window(n_fft, periodic=True)  # scipy's get_window("hann", n_fft)
        fb = mel_filterbank(
            sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, f_min=f_min, f_max=f_max
        )
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_fb", fb, persistent=False)

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> mel power (B, n_mels, frames), before the log."""
        spec = torch.stft(
            wave.float(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (B, F, frames)
        return torch.einsum("mf,bft->bmt", self.mel_fb, spec.abs().pow(2))  # (B, M, frames)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(self.power(wave).clamp(min=1e-10))  # (B, M, frames)


def waves_to_tensor(
    waves: Sequence[np.ndarray | torch.Tensor], rates: Sequence[int], cfg: AudioConfig
) -> torch.Tensor:
    """Clips at any rates -> (B, S) float32 at `cfg.sample_rate`, each `cfg.clip_seconds` long."""
    n = round(cfg.sample_rate * cfg.clip_seconds)
    out = [
        fit_clip(resample_audio(np.asarray(w, dtype=np.float32), int(r), cfg.sample_rate), n)
        for w, r in zip(waves, rates, strict=True)
    ]
    return torch.from_numpy(np.stack(out))  # (B, S)


class AudioTransformer(nn.Module):
    """AST-style encoder: waveform -> log-mel -> (mel x time) patches -> ViT -> (B, width)."""

    def __init__(self, *, cfg: AudioConfig) -> None:
        super().__init__()
        if cfg.n_mels % cfg.patch_freq:
            raise PolysenseError(
                f"model.audio.n_mels={cfg.n_mels} is not a multiple of "
                f"model.audio.patch_freq={cfg.patch_freq}; change one of them"
            )
        self.cfg = cfg
        self.grad_checkpointing = False
        self.num_samples = round(cfg.sample_rate * cfg.clip_seconds)
        frames = 1 + self.num_samples // cfg.hop_length
        self.grid = (cfg.n_mels // cfg.patch_freq, frames // cfg.patch_time)  # (f, t)
        if self.grid[1] < 1:
            raise PolysenseError(
                f"a {cfg.clip_seconds} s clip gives {frames} frames, fewer than "
                f"model.audio.patch_time={cfg.patch_time}; lower patch_time or hop_length"
            )
        w = cfg.width
        self.mel = MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
        )
        patch = (cfg.patch_freq, cfg.patch_time)
        self.patch_embed = nn.Conv2d(1, w, patch, stride=patch)
        n_tokens = self.grid[0] * self.grid[1] + (1 if cfg.pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, w) * 0.02)
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.blocks = make_blocks(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.apply(init_linear)

    @property
    def width(self) -> int:
        return self.cfg.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> standardised log-mel (B, 1, n_mels, frames), cropped to whole patches."""
        if wave.ndim != 2 or wave.shape[1] != self.num_samples:
            raise PolysenseError(
                f"audio of shape {tuple(wave.shape)} does not fit model.audio (expected (B, "
                f"{self.num_samples}) at {self.cfg.sample_rate} Hz); prepare clips with "
                "polysense.models.audio.waves_to_tensor(waves, rates, cfg)"
            )
        spec = self.mel(wave)  # (B, M, frames)
        spec = (spec - self.cfg.norm_mean) / self.cfg.norm_std
        return spec[:, None, :, : self.grid[1] * self.cfg.patch_time]  # (B, 1, M, t*pt)

    def forward_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> tokens (B, N, W) after the final LayerNorm (N = patches [+ cls])."""
        x = self.patch_embed(self.spectrogram(wave).to(self.pos_embed.dtype))  # (B, W, f, t)
        x = rearrange(x, "b c f t -> b (f t) c")  # (B, N, W)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, W)
        x = self.ln_pre(x + self.pos_embed)
        x = run_blocks(self.blocks, x, None, grad_ckpt=self.grad_checkpointing and self.training)
        return self.ln_post(x)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(wave)  # (B, N, W)
        return tokens[:, 0] if self.cfg.pool == "cls" else tokens.mean(dim=1)  # (B, W)

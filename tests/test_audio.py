"""Audio tower: log-mel parity with librosa and a numpy formula, AST shapes, resampling, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from polysense.config import AudioConfig
from polysense.data.readers import fit_clip, resample_audio
from polysense.errors import PolysenseError
from polysense.eval.audio import audio_zeroshot, avc_eval, best_threshold
from polysense.models.audio import AudioTransformer, MelSpectrogram, mel_filterbank, waves_to_tensor

SR, N_FFT, HOP, N_MELS = 16000, 400, 160, 40


def _signal(n: int = 8000, seed: int = 0) -> np.ndarray:
    """Two tones, an amplitude-modulated one and noise: energy in many bands and frames."""
    t = np.arange(n) / SR
    rng = np.random.default_rng(seed)
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * (1 + np.sin(2 * np.pi * 6 * t)) * np.sin(
        2 * np.pi * 2500 * t
    )
    return (wave + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _numpy_logmel(wave: np.ndarray) -> np.ndarray:
    """Independent reference: explicit framing, scipy's Hann window, np.fft, filters drawn with
    np.interp on Slaney's mel formula, 10 log10 with a 1e-10 floor."""
    padded = np.pad(wave.astype(np.float64), N_FFT // 2)
    n_frames = 1 + len(wave) // HOP
    window = scipy.signal.get_window("hann", N_FFT)
    frames = np.stack([padded[i * HOP : i * HOP + N_FFT] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, F)

    def mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        return np.where(
            f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4)
        )

    def hz(m: np.ndarray) -> np.ndarray:
        return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))

    edges = hz(np.linspace(mel(0.0), mel(SR / 2), N_MELS + 2))
    freqs = np.fft.rfftfreq(N_FFT, 1 / SR)
    filters = np.stack(
        [
            np.interp(freqs, edges[m : m + 3], [0.0, 1.0, 0.0], left=0, right=0)
            * 2
            / (edges[m + 2] - edges[m])
            for m in range(N_MELS)
        ]
    )  # (M, F)
    return 10 * np.log10(np.maximum(filters @ power.T, 1e-10))  # (M, frames)


def _torch_logmel(wave: np.ndarray) -> np.ndarray:
    mel = MelSpectrogram(sample_rate=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    return mel(torch.from_numpy(wave)[None])[0].numpy()


def test_log_mel_matches_the_numpy_formula_reference():
    wave = _signal()
    ours, ref = _torch_logmel(wave), _numpy_logmel(wave)
    assert ours.shape == ref.shape == (N_MELS, 1 + len(wave) // HOP)
    err = np.abs(ours - ref).max()
    assert err < 2e-3, f"max abs error {err:.2e} dB"


def test_log_mel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    wave = _signal(seed=1)
    ref = librosa.power_to_db(
        librosa.feature.melspectrogram(
            y=wave, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, center=True
        ),
        top_db=None,
    )
    err = np.abs(_torch_logmel(wave) - ref).max()
    assert err < 2e-3, f"max abs error {err:.2e} dB"  # measured 2.5e-4 dB
    fb = mel_filterbank(sample_rate=SR, n_fft=N_FFT, n_mels=N_MELS, f_min=50.0, f_max=7000.0)
    ref_fb = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=50.0, fmax=7000.0)
    np.testing.assert_allclose(fb.numpy(), ref_fb, atol=1e-6)


def test_a_tone_lands_in_the_mel_band_around_its_frequency():
    fb = mel_filterbank(sample_rate=SR, n_fft=N_FFT, n_mels=N_MELS)
    t = np.arange(SR // 2) / SR
    for freq in (300.0, 1200.0, 4000.0):
        spec = _torch_logmel(np.sin(2 * np.pi * freq * t).astype(np.float32))
        band = int(spec.mean(1).argmax())
        bin_hz = np.fft.rfftfreq(N_FFT, 1 / SR)
        centre = bin_hz[int(fb[band].argmax())]
        assert abs(centre - freq) <= 0.15 * freq + 40


def test_filterbank_rejects_bad_edges():
    with pytest.raises(PolysenseError, match="f_max"):
        mel_filterbank(sample_rate=SR, n_fft=N_FFT, n_mels=8, f_max=SR)


def test_ast_shapes_gradients_and_length_check():
    torch.manual_seed(0)
    cfg = AudioConfig(n_mels=32, patch_freq=8, patch_time=10, width=32, layers=1, heads=2)
    model = AudioTransformer(cfg=cfg)
    assert model.grid == (4, 10)  # 101 frames -> 10 whole patches of 10
    x = torch.randn(3, 16000) * 0.1
    out = model(x)
    assert out.shape == (3, 32)
    out.sum().backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(PolysenseError, match="waves_to_tensor"):
        model(torch.randn(3, 8000))


def test_resampling_keeps_the_pitch_and_clips_are_fitted():
    rate = 22050
    t = np.arange(rate // 2) / rate
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample_audio(wave, rate, 16000)
    assert len(out) == 8000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.fft.rfftfreq(len(out), 1 / 16000)[spectrum.argmax()] - 440) <= 2
    batch = waves_to_tensor([wave, wave[:100]], [rate, rate], AudioConfig())
    assert batch.shape == (2, 16000)
    assert torch.all(batch[0, 8000:] == 0)  # 0.5 s zero-padded to 1 s
    np.testing.assert_array_equal(fit_clip(np.arange(10, dtype=np.float32), 4), [3, 4, 5, 6])


class _Oracle:
    """Embeds class names by one-hot and clips by the class id written in their first sample."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self.cfg = type("C", (), {"audio": AudioConfig(sample_rate=1000, clip_seconds=0.01)})()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        idx = [next(i for i, c in enumerate(self.classes) if c in t) for t in texts]
        return F.one_hot(torch.tensor(idx), len(self.classes)).float()

    def encode_audio(self, waves: torch.Tensor) -> torch.Tensor:
        return F.one_hot(waves[:, 0].round().long(), len(self.classes)).float()

    def encode_image(self, images: list) -> torch.Tensor:
        return torch.stack([torch.as_tensor(im, dtype=torch.float32) for im in images])


def test_audio_zeroshot_scores_against_labels():
    classes = ["red circle", "blue square", "green star"]
    model = _Oracle(classes)
    clips = [(0, "red circle"), (1, "blue square"), (2, "green star"), (2, "red circle")]
    samples = [
        {"audio": np.full(10, k, dtype=np.float32), "sample_rate": 1000, "label": label}
        for k, label in clips
    ] + [{"audio": np.zeros(10, np.float32), "sample_rate": 1000, "label": None}]
    out = audio_zeroshot(model, samples, classnames=classes)
    assert out["audio_zeroshot_top1"] == 3 / 4  # the last clip sounds like a green star
    assert out["audio_zeroshot_n_samples"] == 4
    assert out["audio_zeroshot_per_class"]["red circle"] == 1 / 2


def test_avc_threshold_and_accuracy_by_hand():
    pos, neg = torch.tensor([0.9, 0.8, 0.3]), torch.tensor([0.1, 0.2, 0.85])
    assert best_threshold(pos, neg) == pytest.approx(0.25)  # 3/3 positives, 2/3 negatives
    # A model whose audio and image embeddings are the same one-hot of the scene's sound.
    model = _Oracle(["a", "b", "c", "d"])
    samples = []
    for k in range(8):
        objects = [{"color": "red", "shape": "abcd"[k % 4], "size": "small"}]
        image = F.one_hot(torch.tensor(k % 4), 4).float()
        samples.append(
            {"audio": np.full(10, k % 4, np.float32), "sample_rate": 1000, "image": image}
            | {"objects": objects}
        )
    out = avc_eval(model, samples)
    assert out["avc_2afc"] == 1.0 and out["avc_accuracy"] == 1.0

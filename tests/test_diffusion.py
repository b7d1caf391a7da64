"""The diffusion model: schedule algebra, guidance, DDIM against an oracle, training signal."""

from __future__ import annotations

import math

import pytest
import torch

from polysense.errors import PolysenseError
from polysense.models.diffusion import (
    DiffusionConfig,
    TextCondition,
    UNet,
    alpha_bars,
    ddim_sample,
    diffusion_loss,
    guided_output,
    q_sample,
    target_for,
    to_x0_eps,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and avoids OpenMP spin-waits on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = DiffusionConfig(image_size=16, channels=(8, 16, 16), heads=2, text_width=16, timesteps=100)


def _cond(b: int = 3, length: int = 5, width: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, width, generator=g)
    keep = torch.ones(b, length, dtype=torch.bool)
    keep[0, 3:] = False  # a shorter prompt in the batch
    return tokens, keep, torch.randn(b, width, generator=g)


def _net(seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    net = UNet(cfg=DiffusionConfig(**{**TINY.__dict__, **kw}))
    with torch.no_grad():  # zero-initialised output layers would make every test trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_cosine_schedule_is_monotone_and_bounded():
    ab = alpha_bars(1000)
    assert ab.shape == (1000,)
    assert (ab[1:] <= ab[:-1]).all() and (ab[1:900] < ab[:899]).all()
    assert ab[0] > 0.999 and 0 < ab[-1] < 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_targets_invert_to_x0_and_eps(prediction):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    ab = torch.tensor([0.99, 0.5, 0.1, 0.01], dtype=torch.float64)
    x_t = q_sample(x0, noise, ab)
    # hand formula for the forward process
    expect = math.sqrt(0.5) * x0[1] + math.sqrt(0.5) * noise[1]
    torch.testing.assert_close(x_t[1], expect)
    x0_hat, eps_hat = to_x0_eps(prediction, target_for(prediction, x0, noise, ab), x_t, ab)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def test_guidance_zero_is_unconditional_one_conditional_and_linear_between():
    net = _net()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.9, 0.5, 0.1])
    cond = _cond()
    with torch.no_grad():
        c = net(x, t, *cond)  # separate forwards: the reference
        u = net(x, t, *net.null_condition(3))
        torch.testing.assert_close(guided_output(net, x, t, cond, 1.0), c)
        torch.testing.assert_close(guided_output(net, x, t, cond, 0.0), u)
        torch.testing.assert_close(
            guided_output(net, x, t, cond, 5.0), u + 5.0 * (c - u), atol=1e-4, rtol=1e-4
        )
    assert (c - u).abs().max() > 1e-3  # the condition matters, so the checks above can fail


def test_dropped_condition_equals_null_condition():
    net = _net()
    x, t = torch.randn(3, 3, 16, 16), torch.full((3,), 0.5)
    cond = _cond()
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        dropped = net(x, t, *net.drop_condition(*cond, drop))
        null = net(x, t, *net.null_condition(3))
        full = net(x, t, *cond)
    torch.testing.assert_close(dropped[drop], null[drop], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[~drop], full[~drop], atol=1e-5, rtol=1e-5)


def test_padding_tokens_are_ignored():
    net = _net()
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.3)
    tokens, keep, pooled = _cond(b=2)
    junk = tokens.clone()
    junk[0, 3:] = 100.0  # masked-out positions of row 0
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, junk, keep, pooled), net(x, t, tokens, keep, pooled))


class _Oracle(torch.nn.Module):
    """The exact denoiser of a one-point data distribution x*: eps = (x_t - sqrt(ab) x*) /
    sqrt(1 - ab), or the matching v."""

    def __init__(self, target: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.cfg = DiffusionConfig(timesteps=1000, prediction=prediction)
        self.target = target

    def forward(self, x, t, tokens, keep, pooled):
        steps = (t * self.cfg.timesteps).round().long()
        ab = alpha_bars(self.cfg.timesteps)[steps - 1].view(-1, 1, 1, 1).float()
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
        return (
            eps if self.cfg.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * self.target
        )


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_with_exact_denoiser_lands_on_the_data(prediction, steps):
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    oracle = _Oracle(target, prediction)
    cond = _cond(b=2)
    out = ddim_sample(
        oracle, cond, steps=steps, guidance=1.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), atol=1e-3, rtol=0)


def test_ddim_is_deterministic_given_the_seed():
    net = _net()
    cond = _cond(b=2)

    def run(seed: int) -> torch.Tensor:
        return ddim_sample(
            net, cond, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1.0


def test_ddim_rejects_bad_step_counts():
    with pytest.raises(PolysenseError, match="steps=0"):
        ddim_sample(_net(), _cond(b=1), steps=0)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    net = UNet(cfg=DiffusionConfig(**{**TINY.__dict__, "image_size": 8}))
    net.train()
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    cond = _cond(b=8)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)

    def loss_at(seed: int) -> torch.Tensor:
        return diffusion_loss(net, x0, *cond, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():  # the same draws of (t, noise, dropout) before and after
        before = sum(loss_at(s).item() for s in range(8)) / 8
    for step in range(100):
        opt.zero_grad()
        loss_at(100 + step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(8)) / 8
    assert after < 0.9 * before, (before, after)


def test_unet_rejects_sizes_the_levels_cannot_halve():
    with pytest.raises(PolysenseError, match="divisible"):
        UNet(cfg=DiffusionConfig(image_size=36, patch=2, channels=(8, 16, 16), heads=2))


def test_text_condition_trims_padding_without_changing_token_states():
    import polysense

    clip = polysense.load("clip-tiny")
    cond = TextCondition(clip=clip)
    ids = clip.tokenize(["a red circle", "a large blue star in the top left"])  # (2, 32)
    tokens, keep, pooled = cond(ids)
    assert tokens.shape[1] == int((ids != clip.cfg.text.pad_id).sum(1).max()) < ids.shape[1]
    full = clip.text.forward_features(ids)  # untrimmed reference
    torch.testing.assert_close(tokens[keep], full[:, : tokens.shape[1]][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, clip.text(ids), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in cond.parameters())

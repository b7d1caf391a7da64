"""Decoding for autoregressive models: greedy, beam search, temperature / top-p sampling and
minimum-Bayes-risk (consensus) decoding; batched, with a maximum length and stop tokens.

The decoders only need a `Stepper`: given the state after a prefix, `step(ids, state)` feeds one
token per row and returns the next-token logits; `reorder(state, index)` selects/duplicates rows
(beam search). `LMStepper` implements it for `models.lm.GPT` with its KV cache; a test implements
it with a bigram table so beam search can be checked against a hand-computed answer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from polysense.errors import PolysenseError


class Stepper(Protocol):
    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """ids (B,) -> logits (B, V) for the next position, and the new state."""
        ...

    def reorder(self, state: Any, index: torch.Tensor) -> Any:
        """Rows `index` (B',) of the state, in that order."""
        ...


@dataclass
class LMState:
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): (B, H, S, D)
    key_mask: torch.Tensor  # (B, S)


class LMStepper:
    """A `GPT` (models/vlm.py) driven through its KV cache: one new token per step."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def start(self, embeds: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, LMState]:
        """Run the (left-padded) prefix embeds (B, T, C) -> last-position logits (B, V), state."""
        logits, cache = self.lm(embeds, key_mask)
        return logits[:, -1], LMState(cache=cache, key_mask=key_mask)

    def step(self, ids: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        mask = torch.cat([state.key_mask, state.key_mask.new_ones(len(ids), 1)], dim=1)
        x = self.lm.token_embed(ids[:, None])  # (B, 1, C)
        logits, cache = self.lm(x, mask, state.cache)
        return logits[:, -1], LMState(cache=cache, key_mask=mask)

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in state.cache]
        return LMState(cache=cache, key_mask=state.key_mask.index_select(0, index))


def ban(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """logits (..., V) with the `ids` set to -inf: no decoder picks them, softmax gives them 0."""
    index = torch.tensor(list(ids), dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


class MaskedStepper:
    """A `Stepper` whose logits `ban` some ids (the special tokens a response must not hold:
    padding, begin, `<image>`). `mask` bans them from the first logits, which come from the
    prefix, not from `step`."""

    def __init__(self, inner: Any, banned: Sequence[int]) -> None:
        self.inner, self.banned = inner, list(banned)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return ban(logits, self.banned)

    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        logits, state = self.inner.step(ids, state)
        return self.mask(logits), state

    def reorder(self, state: Any, index: torch.Tensor) -> Any:
        return self.inner.reorder(state, index)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (nucleus); the
    rest get -inf. logits (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p  # the top token is always kept (before = 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_or_greedy(
    stepper: Stepper,
    logits: torch.Tensor,
    state: Any,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """temperature 0: greedy (argmax); else sample from softmax(logits / T) after top-p.
    Each row stops at its first stop token (not included) or after max_new_tokens."""
    b = logits.shape[0]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    out: list[list[int]] = [[] for _ in range(b)]
    for t in range(max_new_tokens):
        if temperature <= 0:
            ids = logits.argmax(-1)  # (B,)
        else:
            probs = top_p_filter(logits.float() / temperature, top_p).softmax(-1)
            ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
        is_stop = torch.isin(ids, stops)
        for r in (~done & ~is_stop).nonzero().flatten().tolist():
            out[r].append(int(ids[r]))
        done |= is_stop
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits, state = stepper.step(ids, state)
    return out


def beam_search(
    stepper: Stepper,
    logits: torch.Tensor,
    state: Any,
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    length_penalty: float = 0.0,
) -> list[list[int]]:
    """Batched beam search on summed log-probabilities. A hypothesis ends at a stop token (its
    log-prob counted, the token not returned) or at max_new_tokens; finished ones are ranked by
    score / length**length_penalty (0 = plain sum). A row finishes once it holds `num_beams`
    ended hypotheses and no live beam can still beat the best of them (with length_penalty=0,
    scores only fall as a beam grows)."""
    if num_beams < 1:
        raise PolysenseError(f"num_beams={num_beams}: must be at least 1")
    b, v = logits.shape
    k = num_beams
    stops = set(int(s) for s in stop_ids)
    device = logits.device
    # Live beams: scores (B, K); sequences per row; beams of a row are rows r*K .. r*K+K-1.
    logp = logits.float().log_softmax(-1)  # (B, V)
    state = stepper.reorder(state, torch.arange(b, device=device).repeat_interleave(k))
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all K copies start identical: expand only the first
    seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    row_done = [False] * b
    cand = (scores[:, :, None] + logp[:, None, :]).view(b, k * v)  # (B, K*V)

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for t in range(max_new_tokens):
        top_scores, top_idx = cand.topk(min(2 * k, k * v), dim=-1)  # (B, 2K)
        new_scores = torch.full((b, k), float("-inf"), device=device)
        src = torch.arange(b * k, device=device)  # which old beam each new beam extends
        new_tok = torch.zeros(b * k, dtype=torch.long, device=device)
        new_seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
        last = t == max_new_tokens - 1
        for r in range(b):
            if row_done[r]:
                continue
            filled = 0
            for s, idx in zip(top_scores[r].tolist(), top_idx[r].tolist(), strict=True):
                if s == float("-inf") or filled == k:
                    break
                beam, tok = divmod(idx, v)
                seq = seqs[r][beam]
                if tok in stops:  # ends here (the stop token scores but is not returned)
                    finished[r].append((norm(s, len(seq) + 1), seq))
                    continue
                if last:  # out of length: ends without a stop token
                    finished[r].append((norm(s, len(seq) + 1), [*seq, tok]))
                    filled += 1
                    continue
                new_scores[r, filled] = s
                src[r * k + filled] = r * k + beam
                new_tok[r * k + filled] = tok
                new_seqs[r][filled] = [*seq, tok]
                filled += 1
            best_live = new_scores[r].max().item()
            if len(finished[r]) >= k:
                best_done = max(f[0] for f in finished[r])
                if length_penalty == 0.0 and best_done >= best_live:
                    row_done[r] = True
        if last or all(row_done):
            break
        scores, seqs = new_scores, new_seqs
        state = stepper.reorder(state, src)
        step_logits, state = stepper.step(new_tok, state)
        logp = step_logits.float().log_softmax(-1).view(b, k, v)
        cand = (scores[:, :, None] + logp).view(b, k * v)
        for r in range(b):
            if row_done[r]:
                cand[r] = float("-inf")
    results = []
    for r in range(b):
        if not finished[r]:  # every candidate was cut (max_new_tokens == 0 cannot happen here)
            finished[r].append((float(scores[r, 0]), seqs[r][0]))
        results.append(max(finished[r], key=lambda f: f[0])[1])
    return results


def ngram_counts(tokens: Sequence[Hashable], n: int = 4) -> Counter:
    """Counts of every 1..n-gram of a token sequence."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def ngram_cosine(a: Counter, b: Counter) -> float:
    """Cosine similarity of two n-gram count vectors (0 when either is empty)."""
    dot = sum(v * b.get(g, 0) for g, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def consensus_index(candidates: Sequence[Sequence[Hashable]], n: int = 4) -> int:
    """The candidate with the highest summed 1..n-gram cosine to the others (ties: the first):
    Devlin et al.'s consensus caption, and the minimum-Bayes-risk choice when the candidates
    are samples of a model."""
    grams = [ngram_counts(c, n) for c in candidates]
    scores = [
        sum(ngram_cosine(g, o) for j, o in enumerate(grams) if j != i) for i, g in enumerate(grams)
    ]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mbr_decode(
    stepper: Stepper,
    logits: torch.Tensor,
    state: Any,
    *,
    num_samples: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Minimum-Bayes-risk decoding (Kumar & Byrne 2004) with n-gram cosine as the utility: per
    row the greedy output and `num_samples` samples are the candidates, and the one that agrees
    most with the others (`consensus_index`) is returned. Greedy wins ties, so with no samples
    this is greedy decoding."""
    if num_samples < 0:
        raise PolysenseError(f"num_samples={num_samples}: must be 0 or more")
    kw = {"max_new_tokens": max_new_tokens, "stop_ids": stop_ids}
    greedy = sample_or_greedy(stepper, logits, state, **kw)
    if num_samples == 0:
        return greedy
    b = logits.shape[0]
    rows = torch.arange(b, device=logits.device).repeat_interleave(num_samples)  # (B*S,)
    samples = sample_or_greedy(
        stepper,
        logits.index_select(0, rows),
        stepper.reorder(state, rows),
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        **kw,
    )
    out = []
    for r in range(b):
        cands = [greedy[r], *samples[r * num_samples : (r + 1) * num_samples]]
        out.append(cands[consensus_index(cands)])
    return out


def generate(
    stepper: Stepper,
    logits: torch.Tensor,
    state: Any,
    *,
    stop_ids: Sequence[int],
    strategy: Literal["greedy", "beam", "sample", "mbr"] = "greedy",
    max_new_tokens: int = 32,
    num_beams: int = 3,
    num_samples: int = 8,
    length_penalty: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Token ids per row (stop token excluded) by the named strategy. `sample` and `mbr` use
    `temperature`, `top_p` and `seed`; `mbr` draws `num_samples` samples per row."""
    if max_new_tokens < 1:
        raise PolysenseError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if strategy == "greedy":
        return sample_or_greedy(
            stepper, logits, state, max_new_tokens=max_new_tokens, stop_ids=stop_ids
        )
    if strategy in ("sample", "mbr"):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise PolysenseError(
                f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
            )
        gen = torch.Generator(device=logits.device).manual_seed(seed)
    if strategy == "mbr":
        return mbr_decode(
            stepper,
            logits,
            state,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            temperature=temperature,
            top_p=top_p,
            generator=gen,
        )
    if strategy == "sample":
        return sample_or_greedy(
            stepper,
            logits,
            state,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            temperature=temperature,
            top_p=top_p,
            generator=gen,
        )
    if strategy == "beam":
        return beam_search(
            stepper,
            logits,
            state,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            length_penalty=length_penalty,
        )
    raise PolysenseError(f"strategy={strategy!r}; use greedy, beam, sample or mbr")

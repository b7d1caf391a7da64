"""Decoding on a hand-built model: a bigram table whose greedy and beam answers differ, with the
beam answer worked out by hand (and checked by brute-force enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from polysense.decoding import (
    MaskedStepper,
    beam_search,
    consensus_index,
    generate,
    ngram_cosine,
    ngram_counts,
    sample_or_greedy,
    top_p_filter,
)
from polysense.errors import PolysenseError

# Tokens: 0 = EOS, 1 = A, 2 = B, 3 = C. The next-token distribution depends on the last token.
START = [0.0, 0.5, 0.4, 0.1]  # after the prompt
TABLE = {
    1: [0.35, 0.25, 0.2, 0.2],  # after A: nothing stands out
    2: [0.05, 0.0, 0.05, 0.9],  # after B: C, almost surely
    3: [0.9, 0.05, 0.0, 0.05],  # after C: stop
    0: [0.25, 0.25, 0.25, 0.25],  # fed to rows that already stopped (never returned)
}


class Bigram:
    """A `Stepper` over the table; its state is the row ids so `reorder` can be checked."""

    def step(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.tensor([TABLE[int(i)] for i in ids])
        return probs.log(), state

    def reorder(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]


def _start(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([START] * batch).log(), torch.arange(batch)


def _seq_prob(seq: tuple[int, ...]) -> float:
    p, dist = 1.0, START
    for tok in seq:
        p *= dist[tok]
        if tok == 0:
            break
        dist = TABLE[tok]
    return p


def test_greedy_follows_the_argmax_and_stops_at_eos() -> None:
    logits, state = _start()
    # A (0.5), then after A the most likely token is EOS (0.35) -> stop.
    assert sample_or_greedy(Bigram(), logits, state, max_new_tokens=5, stop_ids=[0]) == [[1]]


def test_masked_ids_are_never_picked() -> None:
    """A banned: greedy takes B (0.4), then C (0.9 after B), then EOS (0.9 after C)."""
    stepper = MaskedStepper(Bigram(), banned=[1])
    logits, state = _start()
    out = sample_or_greedy(stepper, stepper.mask(logits), state, max_new_tokens=5, stop_ids=[0])
    assert out == [[2, 3]]
    gen = torch.Generator().manual_seed(0)
    logits, state = _start(64)
    drawn = sample_or_greedy(
        stepper,
        stepper.mask(logits),
        state,
        max_new_tokens=6,
        stop_ids=[0],
        temperature=1.0,
        generator=gen,
    )
    assert drawn and not any(1 in row for row in drawn)


def test_beam_search_finds_the_better_sequence_greedy_misses() -> None:
    logits, state = _start()
    # By hand: greedy gives A EOS with p = 0.5 * 0.35 = 0.175. Beam search (2 beams) keeps A and
    # B after step 1; step 2 ranks B C (0.4 * 0.9 = 0.36), A EOS (0.175, finished), A A (0.125):
    # live beams B C and A A; step 3 finishes B C EOS with p = 0.36 * 0.9 = 0.324 > 0.175, and no
    # live beam can beat it any more: the answer is B C.
    beam = beam_search(Bigram(), logits, state, num_beams=2, max_new_tokens=5, stop_ids=[0])
    greedy = sample_or_greedy(Bigram(), logits, state, max_new_tokens=5, stop_ids=[0])
    assert beam == [[2, 3]]
    assert greedy != beam
    assert _seq_prob((2, 3, 0)) == pytest.approx(0.324)
    # independent check: the most probable finished sequence of up to 4 tokens, by enumeration
    best = max(
        (s for n in range(1, 5) for s in itertools.product(range(4), repeat=n) if s[-1] == 0),
        key=_seq_prob,
    )
    assert list(best[:-1]) == beam[0]


def test_beam_of_one_is_greedy_and_batches_are_independent() -> None:
    logits, state = _start(3)
    one = beam_search(Bigram(), logits, state, num_beams=1, max_new_tokens=5, stop_ids=[0])
    assert one == sample_or_greedy(Bigram(), logits, state, max_new_tokens=5, stop_ids=[0])
    two = beam_search(Bigram(), logits, state, num_beams=2, max_new_tokens=5, stop_ids=[0])
    assert two == [[2, 3]] * 3


def test_max_new_tokens_cuts_hypotheses() -> None:
    logits, state = _start()
    # Only one token allowed: A (0.5) beats B (0.4); no stop token is generated.
    assert beam_search(Bigram(), logits, state, num_beams=2, max_new_tokens=1, stop_ids=[0]) == [
        [1]
    ]
    assert generate(Bigram(), logits, state, stop_ids=[0], max_new_tokens=1) == [[1]]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    kept = torch.isfinite(top_p_filter(logits, 0.5))[0].tolist()
    assert kept == [True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_sampling_is_seeded_and_tiny_top_p_is_greedy() -> None:
    logits, state = _start(64)
    kw = {"stop_ids": [0], "max_new_tokens": 4, "strategy": "sample", "temperature": 1.0}
    a = generate(Bigram(), logits, state, seed=1, **kw)
    b = generate(Bigram(), logits, state, seed=1, **kw)
    assert a == b
    assert len({tuple(r) for r in a}) > 1  # 64 samples are not all the same
    # first-token frequency of A follows its probability (0.5) within a loose bound
    firsts = [r[0] for r in generate(Bigram(), *_start(2000), seed=2, **kw) if r]
    assert abs(sum(t == 1 for t in firsts) / 2000 - 0.5) < 0.05
    greedy = generate(Bigram(), logits, state, stop_ids=[0], max_new_tokens=4)
    nucleus = generate(Bigram(), logits, state, seed=3, top_p=1e-6, **kw)
    assert nucleus == greedy


def test_consensus_index_by_hand() -> None:
    # [1, 2] and [1, 2, 3]: unigram+bigram+trigram counts {1, 2, 12} vs {1, 2, 3, 12, 23, 123};
    # cosine = 3 / (sqrt(3) * sqrt(6)) = 0.7071.
    a, b = ngram_counts([1, 2]), ngram_counts([1, 2, 3])
    assert math.isclose(ngram_cosine(a, b), 3 / math.sqrt(18))
    assert ngram_cosine(a, ngram_counts([])) == 0.0
    # Sums of cosines to the others: [3] 0 + 1/sqrt(6) = 0.408; [1, 2] 0 + 0.707;
    # [1, 2, 3] 0.408 + 0.707 = 1.115: the last one.
    assert consensus_index([[3], [1, 2], [1, 2, 3]]) == 2
    assert consensus_index([[3], [1, 2], [1, 2, 4]]) == 1  # 0 / 0.707 / 0.707: the first
    assert consensus_index([[1, 2], [1, 2], [3]]) == 0  # ties go to the first
    assert consensus_index([[5]]) == 0


def test_mbr_is_the_consensus_of_greedy_and_the_samples() -> None:
    logits, state = _start(3)
    kw = {"stop_ids": [0], "max_new_tokens": 4}
    # Reference: the candidates drawn independently (greedy, then 16 seeded samples per row).
    greedy = sample_or_greedy(Bigram(), logits, state, **kw)
    rows = torch.arange(3).repeat_interleave(16)
    gen = torch.Generator().manual_seed(5)
    samples = sample_or_greedy(
        Bigram(), logits[rows], state[rows], temperature=1.0, generator=gen, **kw
    )
    expected = []
    for r in range(3):
        cands = [greedy[r], *samples[16 * r : 16 * (r + 1)]]
        expected.append(cands[consensus_index(cands)])
    mbr = generate(Bigram(), logits, state, strategy="mbr", num_samples=16, seed=5, **kw)
    assert mbr == expected
    assert generate(Bigram(), logits, state, strategy="mbr", num_samples=0, **kw) == greedy


def test_bad_decoding_arguments_are_clear_errors() -> None:
    logits, state = _start()
    with pytest.raises(PolysenseError, match="strategy"):
        generate(Bigram(), logits, state, stop_ids=[0], strategy="nucleus")
    with pytest.raises(PolysenseError, match="temperature"):
        generate(Bigram(), logits, state, stop_ids=[0], strategy="sample", temperature=0.0)
    with pytest.raises(PolysenseError, match="max_new_tokens"):
        generate(Bigram(), logits, state, stop_ids=[0], max_new_tokens=0)
    assert math.isclose(sum(START), 1.0)

"""Conditioning on a dataset (`memory`, `adapt`): the definitions of MISSION.md hold in every mode,
on the tiny random model (fast) — the chain rule, C(X) alone as the X part of C(X·Y), a decodable
mixture, batch invariance, and a memory that finds what the window cannot see."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from models.adapt import AdaptCompressor
from models.conditioning import conditioned
from models.lm import Joined
from models.memory import (
    MemoryCompressor,
    MemoryParams,
    copy_mixture,
    copy_predictions,
    head_basis,
    mixture_bits,
    search,
    sequence_digest,
    window_starts,
)
from models.ngram import ngram_counts, ngram_mixture, token_bits
from models.protocol import Segment, UnsupportedMode
from models.tiny import tiny_compressor


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


@pytest.fixture(scope="module")
def lm():
    return tiny_compressor(context_tokens=32, stride=16)


@pytest.fixture(scope="module", params=["memory", "adapt"])
def mode_compressor(request, lm):
    return conditioned(lm, request.param, 1 << 26, 1 << 26)


def test_chain_rule_and_prefix_part(mode_compressor) -> None:
    x, y = tokens(150, 1), tokens(60, 2)
    joint = mode_compressor.score([Segment(x, y)])[0]
    alone = mode_compressor.score([Segment((), x)])[0]
    y_alone = mode_compressor.score([Segment((), y)])[0]
    assert joint.prefix_bits == alone.target_bits  # C(X) alone is the X part of C(X·Y)
    assert joint.target_bits > 0 and y_alone.target_bits > 0
    if isinstance(mode_compressor, MemoryCompressor):
        # memory mode codes token by token: X·Y as one sequence is C(X) + C(Y|X)
        whole = mode_compressor.score([Segment((), x + y)])[0]
        assert math.isclose(whole.target_bits, joint.prefix_bits + joint.target_bits, abs_tol=0.01)


def test_short_sequences_are_coded_as_in_context_mode(lm, mode_compressor) -> None:
    """Within one window the memory is empty and nothing has been learned yet: the LM's code."""
    x = tokens(20, 3)
    assert mode_compressor.score([Segment((), x)])[0] == lm.score([Segment((), x)])[0]


def test_same_bits_alone_and_in_a_batch(mode_compressor) -> None:
    x, ys = tokens(120, 4), [tokens(n, 10 + n) for n in (10, 40, 70)]
    together = mode_compressor.score([Segment(x, y) for y in ys])
    for y, t in zip(ys, together, strict=True):
        assert mode_compressor.score([Segment(x, y)])[0] == t


def test_cached_state_gives_the_same_bits(lm) -> None:
    for mode in ("memory", "adapt"):
        compressor = conditioned(lm, mode, 1 << 26, 1 << 26)
        x, y = tokens(130, 5), tokens(50, 6)
        first = compressor.score([Segment(x, y)])[0]
        fresh = conditioned(lm, mode, 0, 0).score([Segment(x, y)])[0]  # nothing kept
        again = compressor.score([Segment(x, y)])[0]  # X's memory / trained state from the cache
        assert first == fresh == again


def test_a_memory_over_the_cache_bound_is_built_once_per_call(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing kept between calls (bound 0), a call that needs X's memory several times (C(X)
    and C(Y|X) for many Ys, in any order) builds it once, and gives the bits the cache would."""
    compressor = conditioned(lm, "memory", 0, 0)
    x, other = tokens(130, 13), tokens(90, 14)
    ys = [tokens(40, 15 + i) for i in range(3)]
    segments = [Segment(x, ys[0]), Segment(other, ys[1]), Segment((), x), Segment(x, ys[2]), Segment(other, ys[0])]
    built = []
    code = compressor._code

    def counting(tokens, before, progress):
        if before is None:
            built.append(len(tokens))
        return code(tokens, before, progress)

    monkeypatch.setattr(compressor, "_code", counting)
    bits = compressor.score(segments)
    assert sorted(built) == [len(other), len(x)]
    assert bits == conditioned(lm, "memory", 1 << 26, 0).score(segments)


def test_the_horizon_bounds_the_knn_memory_but_not_the_copy_model(lm) -> None:
    """With a horizon the kNN memory holds only the `horizon` tokens before the window: a copy
    further back is out of its reach, but the copy model and the n-gram cache, which see every
    earlier token, still find it; a horizon longer than the sequence changes no bit."""
    from models.conditioning import MEMORY

    tiny = MEMORY["tiny-random"]
    y = tokens(60, 21)
    x = y + tokens(400, 22)  # Y's copy 400+ tokens before Y, a 64-token horizon cannot see it

    def ratio(**changes) -> float:
        compressor = MemoryCompressor(lm, dataclasses.replace(tiny, **changes), 1 << 26)
        return compressor.score([Segment(x, y)])[0].target_bits / lm.score([Segment((), y)])[0].target_bits

    assert ratio(order=0, ngram_smoothing=()) < 0.5  # the kNN memory alone finds the copy...
    assert ratio(order=0, ngram_smoothing=(), horizon=64) > 0.9  # ...but not beyond its horizon
    assert ratio(horizon=64, ngram_smoothing=()) < 0.5  # the copy model does
    assert ratio(horizon=64, order=0) < 0.5  # and the n-gram cache does
    assert ratio(horizon=10_000) == ratio()


def test_projected_keys_span_the_heads_top_directions() -> None:
    """`head_basis`: orthonormal columns on the head's top right singular vectors (what the logits
    respond to most), so a key keeps the part of a state that moves the logits most; scaled, the
    distances are the logits' own in those directions."""
    g = torch.Generator().manual_seed(3)
    head = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 24, dtype=torch.float64)
    values = torch.linalg.svdvals(head)
    basis = head_basis(head.float(), 8, scaled=False).double()
    assert torch.allclose(basis.T @ basis, torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert math.isclose(float((head @ basis).square().sum()), float(values[:8].square().sum()), rel_tol=1e-5)
    h, h2 = torch.randn(2, 24, generator=g, dtype=torch.float64)
    scaled = head_basis(head.float(), 24, scaled=True).double()  # every direction: the logits' distance
    logits_distance = float((head @ (h - h2)).square().sum())
    assert math.isclose(float(((h - h2) @ scaled).square().sum()), logits_distance, rel_tol=1e-4)


def test_projected_keys_keep_the_definitions(lm) -> None:
    """With keys projected (`dims`), coding is still sequential (C(X·Y) = C(X) + C(Y|X)), batch
    invariant and finds a copy beyond the window."""
    from models.conditioning import MEMORY

    compressor = MemoryCompressor(lm, dataclasses.replace(MEMORY["tiny-random"], dims=16), 1 << 26)
    assert compressor.key_dim == 16
    y = tokens(60, 41)
    x = tokens(150, 42) + y + tokens(150, 43)
    joint = compressor.score([Segment(x, y)])[0]
    whole = compressor.score([Segment((), x + y)])[0]
    assert math.isclose(whole.target_bits, joint.prefix_bits + joint.target_bits, abs_tol=0.01)
    assert joint.target_bits < 0.3 * lm.score([Segment((), y)])[0].target_bits
    ys = [tokens(n, 44 + n) for n in (10, 40)]
    together = compressor.score([Segment(x, v) for v in ys])
    assert [compressor.score([Segment(x, v)])[0] for v in ys] == together
    assert compressor.params.key != MEMORY["tiny-random"].key


def test_a_trimmed_memory_codes_what_follows_as_the_whole_one(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """X's memory keeps only the keys a later token's horizon can reach (whole KEY_BLOCKs are
    dropped): C(Y|X) from it is C(X·Y) - C(X) of the sequence coded in one piece, where nothing
    was dropped."""
    from models.conditioning import MEMORY
    from models.memory import KEY_BLOCK, KeyBuffer

    compressor = MemoryCompressor(lm, dataclasses.replace(MEMORY["tiny-random"], horizon=100), 1 << 26)
    x, y = tokens(KEY_BLOCK + 700, 23), tokens(80, 24)
    kept = compressor.memory(x)
    assert kept.key_offset == KEY_BLOCK and len(kept.keys) == len(x) - KEY_BLOCK and len(kept.values) == len(x)
    joint = compressor.score([Segment(x, y)])[0]
    whole = compressor.score([Segment((), x + y)])[0]
    assert math.isclose(whole.target_bits, joint.prefix_bits + joint.target_bits, abs_tol=0.01)
    # The same bits as a memory that drops nothing (the horizon still limits each search).
    keeping = MemoryCompressor(lm, compressor.params, 0)
    monkeypatch.setattr(KeyBuffer, "drop_below", lambda self, row: None)
    assert keeping.score([Segment(x, y), Segment((), x + y)]) == [joint, whole]
    assert keeping.memory(x).key_offset == 0
    with pytest.raises(ValueError, match="dropped"):  # a query below the offset is refused, not answered wrongly
        search(kept.keys[:1].float(), kept.keys, kept.norms, torch.tensor([KEY_BLOCK + 10]), 4, offset=KEY_BLOCK)


def test_coding_a_step_at_a_time_gives_the_mixture_of_all_the_neighbours(lm) -> None:
    """The memory applies the kNN mixture a step of windows at a time (holding one step's
    neighbours, not every token's): the bits are exactly those of `mixture_bits` over every
    token's neighbours at once, for X alone and for Y after X's memory, copy model included, then
    mixed with the n-gram cache counted over the whole sequence (the mode counts X's positions for
    Y in X's index: the same)."""
    from models.conditioning import MEMORY
    from models.memory import copy_predictions

    compressor = MemoryCompressor(lm, MEMORY["tiny-random"], 1 << 26, windows_per_step=2)
    x = tokens(300, 25) + tokens(120, 26) + tokens(200, 27) + tokens(120, 26)  # a copy inside X
    y = tokens(50, 28) + tokens(120, 26)[:60]  # and one of X's records in Y
    params = compressor.params
    memory_x = compressor.memory(x)
    assert memory_x.copy_index is not None  # Y's copy model below looks X's positions up in it
    assert memory_x.ngram_index is not None  # and Y's n-gram cache counts X's positions in it
    for sequence, before in ((x, None), (x + y, memory_x)):
        found = compressor.neighbours(sequence, before)
        start = len(before.values) if before is not None else 0
        run, state = (before.run_at_end(), before.copy_state) if before is not None else (0, (-1, 0))
        predicted, matched, _, _ = copy_predictions(sequence, start, found.limits.tolist(), params.order, state)
        expected, hits = mixture_bits(
            found.lm_bits, found.targets, found.distances, found.tokens, found.has_memory, run, params,
            predicted, matched,
        )  # fmt: skip
        c, n, _ = ngram_counts(
            np.asarray(sequence), start, found.limits.numpy(), params.ngram_order, token_bits(compressor.vocab)
        )
        expected = ngram_mixture(expected, c, n, params, compressor.vocab)
        coded = compressor._code(sequence[start:], before, None)
        assert torch.equal(coded.bits, expected) and torch.equal(coded.hits, hits)
        assert bool((predicted >= 0).any()) and bool(hits.any())  # both parts of the mixture took part
    assert torch.equal(memory_x.bits, compressor._code(x, None, None).bits)


def test_recent_digests_are_the_tokens_digests_computed_once_per_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.memory as memory

    computed = []
    real = memory.sequence_digest
    monkeypatch.setattr(memory, "sequence_digest", lambda t: computed.append(t) or real(t))
    digests = memory.RecentDigests(size=2)
    a, b, c = (tuple(tokens(100, seed)) for seed in (1, 2, 3))
    for t in (a, a, b, a, c, a[:50] + a[50:], list(b), b):
        assert digests(t) == real(t)
    # a once; b once; c once; an equal tuple that is another object, a list (mutable), and b again
    # after c and a's copy pushed it out
    assert [x is a or x is b or x is c for x in computed] == [True, True, True, False, False, True]


def test_the_key_buffer_keeps_the_rows_it_has_not_dropped() -> None:
    from models.memory import KEY_BLOCK, KeyBuffer

    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6 * KEY_BLOCK, 4, generator=g).half().float()
    buffer, end = KeyBuffer(4, "cpu"), 0
    for step, n in enumerate([100, 3000, 5000, 700, 4096, 9000, 2000]):
        buffer.append(rows[end : end + n])
        end += n
        buffer.drop_below([0, 50, 4100, 4000, 9000, 12_500, 20_000][step])
        keys, norms = buffer.view()
        assert buffer.offset % KEY_BLOCK == 0 and buffer.end == end
        assert torch.equal(keys.float(), rows[buffer.offset : end]) and torch.equal(
            norms, (rows[buffer.offset : end] ** 2).sum(1)
        )
    keys, norms = buffer.take()
    assert buffer.offset == 16_384 and torch.equal(keys.float(), rows[16_384:end]) and len(keys) == end - 16_384


def test_memory_finds_a_copy_beyond_the_window(lm) -> None:
    y = tokens(60, 7)
    with_copy = tokens(150, 8) + y + tokens(150, 9)
    without = tokens(150, 8) + tokens(60, 11) + tokens(150, 9)
    memory = conditioned(lm, "memory", 1 << 26, 0)
    c_y = lm.score([Segment((), y)])[0].target_bits
    context = lm.score([Segment(with_copy, y)])[0].target_bits / c_y
    copied = memory.score([Segment(with_copy, y)])[0].target_bits / c_y
    assert context > 0.9  # the copy is 150+ tokens before Y: the 32-token window cannot see it
    assert copied < 0.5 * context
    # No false copy, against the mode's own C(Y) (as the containment check measures it): the
    # n-gram cache's counts of earlier tokens improve on the random LM's predictions with any X,
    # and even with Y's own tokens alone (0.86 of the LM's C(Y) here).
    absent = memory.score([Segment(without, y)])[0].target_bits / memory.score([Segment((), y)])[0].target_bits
    assert absent > 0.8


def test_adapt_learns_from_x(lm) -> None:
    """Training on an X that contains Y's tokens lowers C(Y|X) more than an X that does not."""
    y = tokens(40, 12)
    adapt = conditioned(lm, "adapt", 1 << 26, 1 << 26)
    with_y = adapt.score([Segment(tokens(100, 13) + y * 3 + tokens(60, 14), y)])[0].target_bits
    without = adapt.score([Segment(tokens(100, 13) + tokens(120, 15) + tokens(60, 14), y)])[0].target_bits
    assert with_y < without


def test_adapt_follows_a_copy_beyond_the_window(lm) -> None:
    """`adapt`'s copy model and n-gram cache each find Y's copy 150+ tokens before Y, where the
    32-token window cannot see it: C(Y|X) far below the same mode without them, and no false
    copy without it."""
    params = conditioned(lm, "adapt", 0, 0).params
    assert params.order
    y = tokens(60, 31)
    with_copy, without = tokens(150, 32) + y + tokens(150, 33), tokens(150, 32) + tokens(60, 34) + tokens(150, 33)

    def c(x: list[int], **changes) -> float:
        return AdaptCompressor(lm, dataclasses.replace(params, **changes), 0).score([Segment(x, y)])[0].target_bits

    c_y = lm.score([Segment((), y)])[0].target_bits
    assert params.ngram_smoothing
    alone = c(with_copy, order=0, ngram_smoothing=())
    assert alone > 0.8 * c_y  # training on X alone does not find it
    assert c(with_copy, ngram_smoothing=()) < 0.3 * alone  # the copy model does
    assert c(with_copy, order=0) < 0.3 * alone  # and so does the n-gram cache
    assert c(without, ngram_smoothing=()) > 0.8 * c_y
    # No false copy, against the mode's own C(Y): the n-gram cache's counts of X's tokens improve
    # on the random LM's predictions whatever X holds, as Y's own tokens do when it is coded alone.
    y_alone = AdaptCompressor(lm, params, 0).score([Segment((), y)])[0].target_bits
    assert c(without) > 0.8 * y_alone


def adapt_reference(lm, params, x: list[int], y: list[int]) -> torch.Tensor:
    """Each token's bits of X·Y in `adapt` mode, computed the long way: the adapted LM's bits of X,
    then of Y after X's state, mixed with the copy model run over X·Y in one piece, each token
    following only the tokens before its window (window limits computed here, not by the mode),
    then with the n-gram cache counted over X·Y in one piece below the same limits (the mode
    counts X's positions for Y in X's index)."""
    plain = AdaptCompressor(lm, dataclasses.replace(params, order=0), 0)
    x_bits, _, x_state = plain.lm_bits(x, train_last=True)
    y_bits, _, _ = plain.lm_bits(Joined(x, y), len(x), x_state)
    window = lm.window
    limits = (window_starts(torch.arange(1, len(x + y) + 1), window.context_tokens, window.stride) - 1).clamp_min(0)
    predicted, matched, _, _ = copy_predictions(x + y, 0, limits, params.order)
    mixed = copy_mixture(torch.cat([x_bits, y_bits]), torch.tensor(x + y), predicted, matched, params)
    if not params.ngram_smoothing:
        return mixed
    c, n, _ = ngram_counts(np.asarray(x + y), 0, limits.numpy(), params.ngram_order, token_bits(plain.vocab))
    return ngram_mixture(mixed, c, n, params, plain.vocab)


def assert_adapt_codes_as(lm, params, x: list[int], y: list[int], mixed: torch.Tensor):
    got = AdaptCompressor(lm, params, 1 << 26).score([Segment(x, y)])[0]
    assert math.isclose(got.prefix_bits, float(mixed[: len(x)].sum()), rel_tol=1e-12)
    assert math.isclose(got.target_bits, float(mixed[len(x) :].sum()), rel_tol=1e-12)
    return got


def test_adapt_mixes_the_copy_model_over_x_and_y_as_one_sequence(lm) -> None:
    """C(X) and C(Y|X) are the adapted LM's bits of X, then Y, mixed with the copy model run over
    X·Y in one piece (its state and X's lookup carried from X's state to Y: a match longer than
    the 64 tokens a fresh one counts back)."""
    params = conditioned(lm, "adapt", 0, 0).params
    s = tokens(200, 35)
    x, y = tokens(90, 36) + s[:150] + tokens(80, 37) + s[:100], s[100:140]  # a 100-token copy under way
    got = assert_adapt_codes_as(lm, params, x, y, adapt_reference(lm, params, x, y))
    plain = AdaptCompressor(lm, dataclasses.replace(params, order=0), 0).score([Segment(x, y)])[0]
    assert got.target_bits < 0.2 * plain.target_bits  # the copy under way was followed into Y


def test_adapt_copies_only_from_before_each_tokens_window(lm) -> None:
    """Over two token values every 3-token context recurs all the time, with either successor, so
    the latest occurrence a token may follow changes whenever its window's limit moves by one: the
    mode's bits equal the reference's only if its limits are exactly the window's."""
    params = conditioned(lm, "adapt", 0, 0).params
    rng = random.Random(38)
    x, y = [rng.choice((5, 6)) for _ in range(150)], [rng.choice((5, 6)) for _ in range(70)]
    assert_adapt_codes_as(lm, params, x, y, adapt_reference(lm, params, x, y))


def test_adapt_leaves_the_model_unchanged(lm) -> None:
    x, y = tokens(100, 16), tokens(30, 17)
    before = lm.score([Segment(x, y)])[0]
    conditioned(lm, "adapt", 0, 0).score([Segment(x, y)])
    assert lm.score([Segment(x, y)])[0] == before


def test_the_mixture_is_a_distribution() -> None:
    """For one position, the bits of every possible token sum (as probabilities) to 1."""
    vocab, k = 50, 4
    g = torch.Generator().manual_seed(0)
    p_lm = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0)
    dist = torch.sort(torch.rand(1, k, generator=g) * 30).values.expand(vocab, k)
    neighbours = torch.tensor([[3, 7, 3, 11]]).expand(vocab, k)
    params = MemoryParams(
        k=k, temperature=5.0, bias=3.0, distance=-1.0, run=1.0, order=3, copy_bias=-1.0, copy_length=1.5
    )
    candidates = torch.arange(vocab)
    for run_before, copy in ((0, None), (5, None), (0, (7, 3.0)), (2, (20, 40.0))):
        predicted = None if copy is None else torch.tensor([copy[0]])
        matched = None if copy is None else torch.tensor([copy[1]], dtype=torch.float64)
        # every candidate token as if it were the next one (same state, memory and past)
        bits = torch.stack(
            [
                mixture_bits(
                    -torch.log2(p_lm[v : v + 1]), candidates[v : v + 1], dist[:1], neighbours[:1],
                    torch.tensor([True]), run_before, params, predicted, matched,
                )[0][0]
                for v in range(vocab)
            ]
        )  # fmt: skip
        assert math.isclose(float(torch.exp2(-bits).sum()), 1.0, rel_tol=1e-9)


def test_the_copy_model_follows_an_earlier_occurrence_before_the_window() -> None:
    y = tokens(30, 20)
    sequence = tokens(40, 21) + y + tokens(40, 22) + y
    n, second = len(sequence), 110  # the second copy of y starts at token 110
    everything = list(range(n))  # every earlier token may be followed
    predicted, matched, _, _ = copy_predictions(sequence, 0, everything, 4)
    # From y's fifth token on, the first copy predicts every token, and the match grows.
    assert predicted[second + 4 :].tolist() == sequence[second + 4 :]
    assert matched[second + 4 :].tolist() == [4.0 + i for i in range(n - second - 4)]
    assert (predicted[:second] == -1).all()  # no 4 tokens occur twice before it
    # Nothing may be followed that is not before the token's window.
    none, *_ = copy_predictions(sequence, 0, [0] * n, 4)
    assert (none == -1).all()
    limited, *_ = copy_predictions(sequence, 0, [min(t, 60) for t in range(n)], 4)
    # y's first copy is tokens 40-69: followed while it is below 60, then dropped
    assert limited[second + 4 : second + 20].tolist() == sequence[second + 4 : second + 20]
    assert (limited[second + 20 :] == -1).all()
    # Coded in two parts, the second from the first's state: the same predictions.
    head, head_matched, state, index = copy_predictions(sequence[:100], 0, everything[:100], 4)
    tail, tail_matched, _, _ = copy_predictions(sequence, 100, everything[100:], 4, state)
    assert torch.equal(copy_predictions(sequence, 100, everything[100:], 4, state, index)[0], tail)
    assert torch.equal(torch.cat([head, tail]), predicted)
    assert torch.equal(torch.cat([head_matched, tail_matched]), matched)


def _latest(sequence: list[int], t: int, limit: int, order: int) -> int:
    """By brute force: the latest s < min(limit, t) whose `order` tokens before it are t's."""
    if t < order:
        return -1
    earlier = (s for s in range(order, min(limit, t)) if sequence[s - order : s] == sequence[t - order : t])
    return max(earlier, default=-1)


def test_the_copy_model_finds_the_latest_occurrence_below_each_limit() -> None:
    """The hashed, chunked lookup against a brute force: for each token, the latest earlier
    position below its limit whose `order` tokens before it are the token's."""
    import numpy as np

    import models.memory as memory

    rng = random.Random(5)
    for trial in range(40):
        n, order = rng.randrange(1, 400), rng.choice([1, 2, 3, 4])
        sequence = [rng.randrange(rng.choice([2, 3, 40])) for _ in range(n)]
        first = rng.randrange(0, n + 1)
        limits = [max(0, t - rng.randrange(0, 60)) for t in range(first, n)]
        chunk = rng.choice([7, 1 << 16])
        seq, below = np.asarray(sequence), np.asarray(limits)
        whole, hashes = memory.CopyIndex.build(seq, 0, order)  # every position indexed at once
        head, _ = memory.CopyIndex.build(seq[:first], 0, order)  # or as a memory of X keeps them ...
        tail, tail_hashes = memory.CopyIndex.build(seq, first, order)  # ... and a Y after X indexes its own
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(memory, "_CHUNK", chunk)
            found = memory._latest_occurrences(first, below, hashes, whole, None).tolist()
            split = memory._latest_occurrences(first, below, tail_hashes, tail, head).tolist()
        expected = [_latest(sequence, t, limit, order) for t, limit in zip(range(first, n), limits, strict=True)]
        assert found == expected and split == expected, (trial, chunk)


def test_search_is_exact_and_respects_limits() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(9000, 8, generator=g)
    queries = torch.randn(5, 8, generator=g)
    limits = torch.tensor([0, 1, 100, 5000, 9000])
    d, rows = search(queries, keys, (keys * keys).sum(1), limits, 3)
    for i, limit in enumerate(limits.tolist()):
        if limit == 0:
            assert torch.isinf(d[i]).all()
            continue
        exact = ((keys[:limit] - queries[i]) ** 2).sum(1)
        best = exact.topk(min(3, limit), largest=False)
        assert set(rows[i, : len(best.indices)].tolist()) == set(best.indices.tolist())
        assert torch.allclose(d[i, : len(best.values)], best.values, rtol=1e-4, atol=1e-3)


def test_memory_keeps_half_precision_keys_and_searches_them_exactly(lm) -> None:
    """X's memory stores its keys in fp16 (half the bytes of fp32); a search over them is the
    search over the same values in fp32, so the rounding is the only change."""
    import models.memory as memory

    compressor = conditioned(lm, "memory", 1 << 26, 0)
    x = tokens(130, 12)
    kept = compressor.memory(x)
    assert kept.keys.dtype == memory.KEY_DTYPE == torch.float16 and len(kept.keys) == len(x)
    assert torch.equal(kept.norms, (kept.keys.float() ** 2).sum(1))
    as_fp32 = kept.keys.float()
    queries = as_fp32[-10:] + 0.01
    limits = torch.full((10,), 100)
    half = search(queries, kept.keys, kept.norms, limits, 4)
    full = search(queries, as_fp32, kept.norms, limits, 4)
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


def test_search_is_the_same_whatever_the_query_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries go through a key block QUERY_CHUNK at a time: a query's neighbours (ties among
    duplicated keys included) must not depend on that chunking or on the other queries."""
    import models.memory as memory

    g = torch.Generator().manual_seed(2)
    keys = torch.randn(9000, 8, generator=g)
    keys[6000:6100] = keys[:100]  # duplicated keys: equal distances
    queries = torch.cat([keys[40:60], torch.randn(580, 8, generator=g)])
    limits = torch.sort(torch.randint(0, 9001, (600,), generator=g)).values
    norms = (keys * keys).sum(1)
    results = []
    for chunk in (1, 7, 256, 10_000):
        monkeypatch.setattr(memory, "QUERY_CHUNK", chunk)
        results.append(search(queries, keys, norms, limits, 4))
    for d, rows in results[1:]:
        assert torch.equal(d, results[0][0]) and torch.equal(rows, results[0][1])
    alone = [search(queries[i : i + 1], keys, norms, limits[i : i + 1], 4) for i in (0, 25, 599)]
    for i, (d, rows) in zip((0, 25, 599), alone, strict=True):
        assert torch.equal(d[0], results[0][0][i]) and torch.equal(rows[0], results[0][1][i])


def test_classical_models_offer_context_only() -> None:
    from models.classical import ClassicalCompressor

    info = ClassicalCompressor("gzip").info
    assert [c.mode for c in info.modes] == ["context"]
    assert "32 KiB" in str(info.modes[0].as_dict()["sees"])
    with pytest.raises(UnsupportedMode):
        info.with_mode("memory")


def test_modes_have_their_own_cache_namespace(lm) -> None:
    namespaces = {lm.info.with_mode(m).cache_namespace for m in ("context", "memory", "adapt")}
    assert len(namespaces) == 3
    assert lm.info.with_mode("context").cache_namespace == lm.info.cache_namespace


def test_first_skips_windows_but_not_values(lm) -> None:
    seq = tokens(120, 18)
    full = lm.token_bits([seq])[0]
    part = lm.token_bits([seq], first=[70])[0]
    assert torch.equal(part, full[70:])
    # Several sequences in one call, the states too; the engine converts only the positions from
    # the first window it runs, so a skipped part is never read (nor its ids checked).
    seqs, firsts = [seq, tokens(40, 19), tokens(5, 20), tokens(200, 21)], [70, 0, 5, 199]
    for (bits, states), (part_bits, part_states), f in zip(
        lm.token_states(seqs), lm.token_states(seqs, first=firsts), firsts, strict=True
    ):
        assert torch.equal(part_bits, bits[f:]) and torch.equal(part_states, states[f:])
    unreadable = [10**6] * 100 + seq  # ids no model has, 100 tokens before the window Y needs
    assert torch.equal(lm.token_bits([unreadable], first=[200])[0], lm.token_bits([[3] * 100 + seq], first=[200])[0])
    with pytest.raises(ValueError, match="token ids"):
        lm.token_bits([unreadable], first=[100])


@pytest.mark.parametrize("mode", ["context", "memory", "adapt"])
def test_long_work_reports_progress_in_tokens(lm, mode: str) -> None:
    """Each compressor announces the tokens it will code, then reports them as they are coded,
    in several steps for a long sequence."""
    seen: list[tuple[int, int]] = []
    compressor = conditioned(lm, mode, 0, 0)
    if mode == "context":  # several model batches
        compressor = tiny_compressor(context_tokens=32, stride=16, batch_tokens=64)
    if isinstance(compressor, MemoryCompressor):
        compressor.windows_per_step = 2
    compressor.score([Segment((), tokens(100, 19))], progress=lambda done, planned: seen.append((done, planned)))
    assert sum(d for d, _ in seen) == sum(p for _, p in seen) == 100
    assert len([d for d, _ in seen if d]) >= 2


@pytest.mark.parametrize("mode", ["context", "memory", "adapt"])
def test_short_pairs_report_their_tokens_too(lm, mode: str) -> None:
    """A pair that fits one window (coded as in `context` mode) is counted in the progress in
    tokens like a long one: planned, then done."""
    seen: list[tuple[int, int]] = []
    segments = [Segment(tokens(10, 3), tokens(12, 4)), Segment((), tokens(12, 4))]
    conditioned(lm, mode, 0, 0).score(segments, progress=lambda done, planned: seen.append((done, planned)))
    assert sum(d for d, _ in seen) == sum(p for _, p in seen) >= 12


def test_adapt_replay_changes_only_what_follows_x(lm) -> None:
    """`replay` more passes over X train the model further before Y is coded: C(X) and C(Y) alone
    keep their bits (and C(X) alone runs no replay pass), C(Y|X) changes, and the same bits come
    whatever was asked first (the replayed state is built from the cached coded one)."""
    x, y = tokens(150, 20), tokens(60, 21)
    plain = conditioned(lm, "adapt", 1 << 26, 1 << 26)
    params = dataclasses.replace(plain.params, replay=2)
    first_x = AdaptCompressor(lm, params, 1 << 26)
    work: list[int] = []
    alone = first_x.score([Segment((), x)], progress=lambda done, planned: work.append(planned))[0]
    assert sum(work) == len(x)  # coded once, no replay pass
    assert alone == plain.score([Segment((), x)])[0]
    joint = first_x.score([Segment(x, y)])[0]
    assert joint.prefix_bits == alone.target_bits
    assert joint.target_bits != plain.score([Segment(x, y)])[0].target_bits
    joint_first = AdaptCompressor(lm, params, 0).score([Segment(x, y), Segment((), y)])  # nothing cached
    assert joint_first[0] == joint
    assert joint_first[1] == plain.score([Segment((), y)])[0]


def test_adapt_runs_only_the_adapted_blocks_after_a_blocks_first_step(lm) -> None:
    """With several optimizer steps a block, the steps after the first run the adapted blocks
    only, on what entered them at the first step (the frozen blocks below give the same output):
    the same bits and trained state as running the whole body at every step, replay included."""
    params = dataclasses.replace(conditioned(lm, "adapt", 0, 0).params, steps=3, replay=1)
    x, y = tokens(150, 30), tokens(60, 31)
    short_cut, whole = AdaptCompressor(lm, params, 1 << 26), AdaptCompressor(lm, params, 1 << 26)
    whole._reuse = False
    passes, results = {}, {}
    for name, compressor in (("short_cut", short_cut), ("whole", whole)):
        passes[name] = 0

        def count(*_: object, name: str = name) -> None:
            passes[name] += 1

        hook = lm.body.embed_tokens.register_forward_hook(count)
        try:
            results[name] = compressor.score([Segment(x, y), Segment((), y), Segment((), x)])
        finally:
            hook.remove()
    assert short_cut._reuse_ok()  # the probe found the short cut exact
    assert results["short_cut"] == results["whole"]
    digest = sequence_digest(x)
    kept = (c.cache.get(f"{digest}:replayed").params for c in (short_cut, whole))
    for a, b in zip(*kept, strict=True):
        assert torch.equal(a, b)
    assert passes["short_cut"] < passes["whole"]  # fewer passes through the embedding and frozen blocks


def test_adapt_without_the_short_cut_when_the_probe_fails(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose blocks cannot be run on their own (the probe raises) codes with the whole
    body at every step: the same bits, and the caller's adapters are still in place."""
    params = dataclasses.replace(conditioned(lm, "adapt", 0, 0).params, steps=2)
    x, y = tokens(120, 40), tokens(40, 41)
    expected = AdaptCompressor(lm, params, 0).score([Segment(x, y)])

    def broken(*_: object) -> torch.Tensor:
        raise TypeError("blocks called otherwise")

    compressor = AdaptCompressor(lm, params, 0)
    monkeypatch.setattr(compressor, "_adapted_part", broken)
    assert compressor.score([Segment(x, y)]) == expected
    assert compressor._reuse is False

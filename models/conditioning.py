"""Which conditioning modes each model offers (API v1 `conditioning`), with their fixed, stated
parameters, and the compressor that codes in a mode.

- `context`: every model. A language model sees the sliding window before each token; a classical
  compressor sees what its own format keeps (stated per codec below).
- `memory` (models/memory.py) and `adapt` (models/adapt.py): language models only. Their
  parameters are per model and were chosen on data that is not used to check them
  (benchmarks/conditioning_fit.py, docs/BENCHMARKS.md "Conditioning on a dataset").
"""

from __future__ import annotations

from models.adapt import AdaptCompressor, AdaptParams
from models.lm import LMCompressor
from models.memory import MemoryCompressor, MemoryParams
from models.protocol import CONTEXT, Compressor, Conditioning, WindowPolicy

# Fitted on R8 (Reuters, lower-cased): containment (10 texts copied into the middle of ~100 KB) and
# 4 classes as datasets, by the mean log ratio C_memory / C_context over those cases; the copy
# model's order (3) is the one of 0 (none), 3, 4, 6, 8 with the lowest (benchmarks/conditioning_fit.py).
# The horizon (2^18 tokens, ~1 MB of English) is the smallest power of two that holds every token
# of the 1 MB checks, so no code length measured up to 1 MB changes; beyond it a token's search costs
# a constant ~35 % of a step (`memory` at >= 65 % of `context`'s token rate at any size, where it fell
# towards ~35 % at the 4 MiB limit) and a memory keeps <= 310 MB of keys (576 dimensions; 70 MB
# projected, below). 2^16 would keep 89 % but lost 2 of the 2.8 points `memory` saves over
# `context` on the 1 MB absent case (0.936 against 0.916; benchmarks/memory_scaling.py horizon,
# docs/BENCHMARKS.md). The copy model sees every token.
# Keys: the states projected on the head's top 128 right singular vectors (2026-12-01): by the same
# rule on the same cases, mean log ratio -0.2295 against -0.2325 with all 576 dimensions (scaled by
# the singular values, i.e. logit distances: -0.2023), for 4.5x fewer key bytes and a search 2.2x
# cheaper past the horizon (measured); the rule set before the fit: within 0.005 of the full states.
# The n-gram cache (models/ngram.py, 2026-12-01): orders 0..3, all parameters refitted with it on
# the same cases; mean log ratio -0.2381 against -0.2295 without it (orders 0..2: -0.2334, -0.2336,
# -0.2340); the rule set before the fits: keep the lowest if it gains at least 0.005. Its fitted
# weights use it mostly where the last 3 tokens never occurred before the window but shorter
# contexts did (a[3] = -7.1: where they did, the copy model has it).
# The tiny random model of the tests: one copy model and n-gram cache for both modes.
_TINY_CACHES: dict = {
    "order": 3,
    "copy_bias": 0.0,
    "copy_length": 1.0,
    "ngram_smoothing": (1.0, 1.0, 1.0, 1.0),
    "ngram_bias": (-3.0, -2.0, -1.0, 0.0),
    "ngram_count": 0.5,
}
MEMORY: dict[str, MemoryParams] = {
    "smollm2-135m": MemoryParams(
        k=16,
        temperature=6.9,
        bias=3.44,
        distance=-1.66,
        run=-0.712,
        order=3,
        copy_bias=-5.04,
        copy_length=3.12,
        horizon=1 << 18,
        dims=128,
        ngram_smoothing=(138.736, 15.44, 0.247, 0.034),
        ngram_bias=(-2.731, -2.958, -1.834, -7.097),
        ngram_count=-0.106,
    ),
    # The tiny random model of the tests: distances of its 64-wide states are about 50 to 500.
    "tiny-random": MemoryParams(k=8, temperature=10.0, bias=8.0, distance=-2.0, run=1.0, **_TINY_CACHES),
}
# Chosen on R8 (4 classes, X = 60 texts, Y = 8 texts) by the rule "lowest prequential code of X
# within twice the CPU time of one training step per block": lr 3e-3 with 2 steps coded X in
# 0.978 of the static model's bits (lr 1e-3, 1 step: 0.996; lr 1e-2, 2 steps: 0.974 but a worse
# C(Y|X)). `replay` (more passes over X before Y is coded; C(X) unchanged): 0, by "the lowest
# own-class C(Y|X)" on R8's first 4 classes as datasets (X = 30 texts, Y = 8, seed 0): replay 2
# widened the rows' margins (0.079 against 0.068) by coding the other classes worse, but coded
# Y's own class worse too in 3 of 4 rows (mean ratio 0.899 against 0.879). See docs/BENCHMARKS.md
# "Conditioning on a dataset". The copy model (as `memory`'s): (α, β) and its order fitted on the
# same R8 cases as `memory`'s by the same rule, the mean log ratio of C with it to C without, the
# adapted LM's bits fixed (benchmarks/conditioning_fit.py --mode adapt; order 3 the lowest of 3, 4,
# 6, 8): the copy of Y in X 0.013 of C(Y|X) without it, every X itself 0.983-0.999. The n-gram
# cache (2026-12-01, as `memory`'s), fitted with the copy model by the same rule on the same cases:
# orders 0..3 -0.2081 against -0.1858 without it (0..2: -0.2033, 0..1: -0.2000, 0: -0.1895).
ADAPT: dict[str, AdaptParams] = {
    "smollm2-135m": AdaptParams(
        layers=4,
        rank=8,
        lr=3e-3,
        steps=2,
        order=3,
        copy_bias=-4.87,
        copy_length=3.07,
        ngram_smoothing=(149.89, 0.341, 0.361, 0.054),
        ngram_bias=(-0.258, -1.962, -1.407, -5.552),
        ngram_count=-0.428,
    ),
    "tiny-random": AdaptParams(layers=1, rank=4, lr=1e-2, steps=1, **_TINY_CACHES),
}


def lm_modes(model_id: str, window: WindowPolicy) -> tuple[Conditioning, ...]:
    sees = (
        f"the {window.context_tokens} tokens before each token at most and "
        f"{window.context_tokens - window.stride} at least (sliding window)"
    )
    modes = [Conditioning("context", (("sees", sees),), "")]
    if model_id in MEMORY:
        params = MEMORY[model_id]
        modes.append(Conditioning("memory", tuple(params.as_dict().items()), params.key))
    if model_id in ADAPT:
        params_a = ADAPT[model_id]
        modes.append(Conditioning("adapt", tuple(params_a.as_dict().items()), params_a.key))
    return tuple(modes)


def conditioned(base: Compressor, mode: str, memory_bytes: int, adapt_bytes: int) -> Compressor:
    """The compressor of `base`'s model in `mode` (UnsupportedMode if it offers none)."""
    info = base.info.with_mode(mode)
    if mode == CONTEXT.mode:
        return base
    assert isinstance(base, LMCompressor), f"{info.id} offers {mode} but is not a language model"
    if mode == "memory":
        return MemoryCompressor(base, MEMORY[info.id], memory_bytes)
    return AdaptCompressor(base, ADAPT[info.id], adapt_bytes)

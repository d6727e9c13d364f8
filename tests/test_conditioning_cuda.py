"""`memory` and `adapt` on a CUDA device: skipped without one (CI has none).

    python -m pytest --noconftest tests/test_conditioning_cuda.py

The model has SmolLM2's shapes with 4 layers and random weights (tests/test_engine_cuda.py). On
CUDA in fp32 both modes agree with the CPU's deterministic engine on the same weights; in bf16 (the
served precision) the memory still finds a copy the window cannot see, and adapt still learns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import pytest
import torch

from models.adapt import AdaptCompressor, AdaptParams
from models.conditioning import MEMORY as SHIPPED_MEMORY
from models.lm import LMCompressor
from models.memory import MemoryCompressor
from models.protocol import Conditioning, Segment
from tests.test_engine_cuda import _IdsOnly, model_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MEMORY = SHIPPED_MEMORY["smollm2-135m"]  # the shipped parameters, copy model included
ADAPT = AdaptParams(layers=2, rank=8, lr=1e-3, steps=1)


def offering_modes(lm: LMCompressor) -> LMCompressor:
    modes = (*lm.info.modes, Conditioning("memory", (), "m"), Conditioning("adapt", (), "a"))
    lm.info = dataclasses.replace(lm.info, modes=modes)
    return lm


def engine(model: torch.nn.Module) -> LMCompressor:
    lm = LMCompressor(model, _IdsOnly(), model_id="random", revision="random", context_tokens=256, stride=128)
    return offering_modes(lm)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_pair() -> tuple[LMCompressor, LMCompressor]:
    model = model_of("llama", torch.float32)
    return engine(model), engine(copy.deepcopy(model).cpu())


def test_memory_on_cuda_equals_cpu(fp32_pair) -> None:
    cuda, cpu = fp32_pair
    x, y = tokens(900, 1), tokens(300, 2)
    x = x[:400] + y + x[400:]
    got = MemoryCompressor(cuda, MEMORY, 1 << 30).score([Segment(x, y), Segment((), x + y)])
    ref = MemoryCompressor(cpu, MEMORY, 1 << 30).score([Segment(x, y), Segment((), x + y)])
    for g, r in zip(got, ref, strict=True):
        assert math.isclose(g.target_bits, r.target_bits, rel_tol=1e-3)
    assert math.isclose(got[1].target_bits, got[0].prefix_bits + got[0].target_bits, rel_tol=1e-4)


def test_adapt_on_cuda_equals_cpu(fp32_pair) -> None:
    cuda, cpu = fp32_pair
    x, y = tokens(700, 3), tokens(200, 4)
    got = AdaptCompressor(cuda, ADAPT, 1 << 30).score([Segment(x, y)])[0]
    ref = AdaptCompressor(cpu, ADAPT, 1 << 30).score([Segment(x, y)])[0]
    assert math.isclose(got.prefix_bits, ref.prefix_bits, rel_tol=1e-3)
    assert math.isclose(got.target_bits, ref.target_bits, rel_tol=1e-3)


def test_bf16_memory_finds_the_copy_and_adapt_learns() -> None:
    lm = engine(model_of("llama", torch.bfloat16))
    y = tokens(300, 5)
    with_copy, without = tokens(600, 6) + y + tokens(600, 7), tokens(600, 6) + tokens(300, 8) + tokens(600, 7)
    c_y = lm.score([Segment((), y)])[0].target_bits
    memory = MemoryCompressor(lm, MEMORY, 1 << 30)
    assert memory.score([Segment(with_copy, y)])[0].target_bits < 0.5 * c_y
    assert memory.score([Segment(without, y)])[0].target_bits > 0.8 * c_y
    adapt = AdaptCompressor(lm, dataclasses.replace(ADAPT, lr=1e-2), 1 << 30)
    learned = adapt.score([Segment(tokens(200, 9) + y * 3, y)])[0].target_bits
    unrelated = adapt.score([Segment(tokens(200, 9) + tokens(900, 10), y)])[0].target_bits
    assert learned < unrelated

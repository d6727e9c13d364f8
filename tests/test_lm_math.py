"""The code-length math of LMCompressor, on a tiny random model (no real weights, seconds)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from models.lm import Joined, LMCompressor, window_spans
from models.protocol import Compressor, Segment, TokenizationError, WindowPolicy
from models.tiny import ByteTokenizer, tiny_compressor, tiny_model

LN2 = math.log(2.0)
TEXT_X = "Compression is prediction: a model that predicts well codes data in few bits. "
TEXT_Y = "Shared information is what X tells about Y, café naïve 日本語 🎉."


@pytest.fixture(scope="module")
def lm() -> LMCompressor:
    return tiny_compressor()


@pytest.fixture(scope="module")
def windowed() -> LMCompressor:
    return tiny_compressor(context_tokens=16, stride=8)


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


def test_implements_protocol(lm: LMCompressor) -> None:
    assert isinstance(lm, Compressor)
    assert lm.info.kind == "lm"
    assert lm.info.window == WindowPolicy(context_tokens=512, stride=256)  # min(2048, max positions)
    assert lm.info.context_tokens == 512
    assert len(lm.info.revision) == 64
    assert tiny_compressor().info.revision == lm.info.revision  # deterministic weights
    assert tiny_compressor(seed=1).info.revision != lm.info.revision


@pytest.mark.parametrize("fixture", ["lm", "windowed"])
def test_chain_rule(fixture: str, request: pytest.FixtureRequest) -> None:
    comp: LMCompressor = request.getfixturevalue(fixture)
    x, y = comp.encode(TEXT_X), comp.encode(TEXT_Y)
    joint, whole, alone = comp.score([Segment(x, y), Segment((), x + y), Segment((), x)])
    assert whole.prefix_bits == 0.0
    assert close(joint.prefix_bits + joint.target_bits, whole.target_bits)
    # C(X) computed alone equals the X part of C(X·Y), windows included.
    assert close(joint.prefix_bits, alone.target_bits)
    assert joint.target_bits > 0 and joint.prefix_bits > 0


def test_every_token_scored_once_with_its_window() -> None:
    policy = WindowPolicy(context_tokens=16, stride=8)
    n_positions = 101  # BOS + 100 tokens
    spans = window_spans(n_positions, policy)
    scored = [p for _, end, score_from in spans for p in range(score_from, end)]
    assert sorted(scored) == list(range(1, n_positions))
    for start, end, score_from in spans:
        assert end - start <= 16 and start <= score_from - 1  # the predicting position is inside
        assert score_from == 1 or score_from - start == 16 - 8  # at least context - stride before


def test_windowed_bits_match_brute_force(windowed: LMCompressor) -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(3, 259) for _ in range(100)]
    bits = windowed.token_bits([tokens])[0]
    full = [ByteTokenizer.bos_token_id, *tokens]
    context, stride = 16, 8
    with torch.inference_mode():
        for p in range(1, len(full)):
            k = 0 if p < context else (p - context) // stride + 1
            start = k * stride
            window = torch.tensor([full[start : min(start + context, len(full))]])
            logits = windowed.model(input_ids=window).logits[0, p - 1 - start]
            ref = -torch.log_softmax(logits.double(), dim=-1)[full[p]].item() / LN2
            assert math.isclose(bits[p - 1].item(), ref, rel_tol=1e-4, abs_tol=1e-4), p
    # The window matters: with the whole past, late tokens get other bits (the test has teeth).
    unwindowed = tiny_compressor(context_tokens=128, stride=64).token_bits([tokens])[0]
    assert (unwindowed[20:] - bits[20:]).abs().max() > 0.1
    assert torch.allclose(unwindowed[:15], bits[:15], atol=1e-4)


def test_batching_invariance() -> None:
    comp = tiny_compressor(context_tokens=32, stride=16, batch_tokens=200)
    rng = random.Random(1)
    segments = [
        Segment(
            tuple(rng.randrange(3, 259) for _ in range(rng.randrange(0, 60))),
            tuple(rng.randrange(3, 259) for _ in range(rng.randrange(0, 60))),
        )
        for _ in range(40)
    ]
    together = comp.score(segments)
    for segment, batched in zip(segments, together, strict=True):
        (alone,) = comp.score([segment])
        assert close(batched.prefix_bits, alone.prefix_bits, rel=1e-4)
        assert close(batched.target_bits, alone.target_bits, rel=1e-4)
    comp.batch_tokens = 100_000  # one big padded batch
    for a, b in zip(comp.score(segments), together, strict=True):
        assert close(a.prefix_bits, b.prefix_bits, rel=1e-4)
        assert close(a.target_bits, b.target_bits, rel=1e-4)


def test_empty_prefix_and_target(lm: LMCompressor) -> None:
    x = lm.encode(TEXT_X)
    assert lm.encode("") == ()
    none, only_x, only_target = lm.score([Segment((), ()), Segment(x, ()), Segment((), x)])
    assert (none.prefix_bits, none.target_bits) == (0.0, 0.0)
    assert only_x.target_bits == 0.0
    assert close(only_x.prefix_bits, only_target.target_bits)
    assert lm.score([]) == []
    # One token still pays for itself after the start token.
    assert lm.score([Segment((), x[:1])])[0].target_bits > 0


def test_encode_round_trip(lm: LMCompressor) -> None:
    text = TEXT_X + TEXT_Y + "\r\n\t\x00"
    assert ByteTokenizer().decode(list(lm.encode(text))) == text
    with pytest.raises(TokenizationError, match="not valid Unicode"):
        lm.encode("lone \ud800 surrogate")


class LossyTokenizer(ByteTokenizer):
    """Forgets case, like an uncased tokenizer: no code length is defined for cased text."""

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = True) -> list[int]:
        return super().encode(text.lower(), add_special_tokens, split_special_tokens)


def test_lossy_tokenizer_is_refused() -> None:
    comp = LMCompressor(tiny_model(), LossyTokenizer(), model_id="lossy-test", revision="0" * 64)
    assert comp.encode("already lower") == tuple(ByteTokenizer().encode("already lower"))
    with pytest.raises(TokenizationError, match=r"lossy-test.*at byte 6"):
        comp.encode("lower UPPER")


def test_final_logit_softcapping_is_applied() -> None:
    model = tiny_model()
    model.config.final_logit_softcapping = 3.0
    comp = LMCompressor(model, ByteTokenizer(), model_id="softcap-test", revision="0" * 64)
    tokens = ByteTokenizer().encode(TEXT_X)
    bits = comp.token_bits([tokens])[0]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, *tokens]])).logits[0, :-1].double()
    capped = torch.tanh(logits / 3.0) * 3.0
    ref = -torch.log_softmax(capped, dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1) / LN2
    assert torch.allclose(bits, ref, rtol=1e-4, atol=1e-5)
    assert bits.max() < 2 * 6.0 / LN2 + 1  # capped logits bound the surprisal


def test_invalid_policy_and_tokens() -> None:
    with pytest.raises(ValueError, match="stride"):
        tiny_compressor(context_tokens=16, stride=16)
    with pytest.raises(ValueError, match="context_tokens"):
        tiny_compressor(context_tokens=10_000)
    with pytest.raises(ValueError, match="token ids"):
        tiny_compressor().token_bits([[5, 259]])


def test_stale_conversion_work_dirs_are_removed(tmp_path) -> None:
    """A conversion killed before its `finally` leaves `.convert-*` behind; the next one removes
    it when its owner is gone, and leaves a live converter's and a recent unowned dir alone."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    from models.weights import remove_stale_work_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    dirs = {}
    for name, owner in [("dead", dead.pid), ("alive", os.getpid()), ("elsewhere", None), ("unowned", None)]:
        d = tmp_path / f".convert-abc-{name}"
        (d / "gguf").mkdir(parents=True)
        if owner is not None:
            (d / "owner.json").write_text(json.dumps({"host": host, "pid": owner}))
        dirs[name] = d
    (dirs["elsewhere"] / "owner.json").write_text(json.dumps({"host": host + "-other", "pid": dead.pid}))
    old = tmp_path / ".convert-abc-old"
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    (tmp_path / "smollm2-135m").mkdir()  # a converted model is never touched
    removed = remove_stale_work_dirs(tmp_path)
    assert sorted(p.name for p in removed) == [".convert-abc-dead", ".convert-abc-old"]
    assert not dirs["dead"].exists() and not old.exists()
    assert dirs["alive"].is_dir() and dirs["elsewhere"].is_dir() and dirs["unowned"].is_dir()
    assert (tmp_path / "smollm2-135m").is_dir()


def test_joined_tokens_read_as_the_concatenation() -> None:
    """`Joined(prefix, target)` (how the engine reads X·Y without copying X for each Y) has the
    length, items, slices and iteration of prefix + target, whatever the slice's bounds."""
    prefix, target = (5, 6, 7, 8), [9, 10, 11]
    joined, whole = Joined(prefix, target), [*prefix, *target]
    assert len(joined) == len(whole) and list(joined) == whole
    for i in range(-len(whole), len(whole)):
        assert joined[i] == whole[i]
    for index in (len(whole), -len(whole) - 1):
        with pytest.raises(IndexError):
            joined[index]
    bounds = [None, *range(-9, 10)]
    for start in bounds:
        for stop in bounds:
            for step in (None, 1, 2, -1):
                assert joined[start:stop:step] == whole[start:stop:step], (start, stop, step)

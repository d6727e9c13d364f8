"""`adapt` conditioning: the prequential code of a dataset (seed 003; Blier & Ollivier 2018): a
coder that learns from what it has coded.

C(X) is the sum over X's blocks of each block's code length under the model trained on the blocks
before it — the area under the online training curve. A block is the scored part of one sliding
window (`WindowPolicy`: the first window's 2,047 tokens, then `stride` tokens each), so a block is
coded with the window's usual context and then trained on: `steps` optimizer steps, the first
step's forward pass also coding the block. C(Y|X) codes Y's
blocks the same way, starting from the model trained on all of X (X's last, partial block
included: the blocks are cut at the X|Y boundary), then `replay` more training passes over X's
blocks (a decoder has X by then and can repeat them), and training on through Y, so
C(X·Y) = C(X) + C(Y|X) exactly and C(Y) alone is Y's own prequential code.

A copy model (`order` > 0) is mixed in as in `memory` mode (models/memory.py): the token after the
latest earlier occurrence of the last `order` tokens anywhere before the window is predicted with
weight μ = μ_max · σ(α + β · ln L), L the tokens that occurrence has matched, and followed while
it predicts right. Training learns what a dataset's text is like; the copy model finds what it
repeats verbatim, beyond the window (Y's records inside a large X), which training alone barely
sees. Then the n-gram cache of models/ngram.py (with `ngram_smoothing`), as in `memory` mode:
what followed every earlier occurrence, before the window, of the last 0..K tokens, counted. Both
read only the tokens, so they change neither the training nor its cost (~2 s and ~4 s a million
tokens); the copy model's state after X and the lookup and index of X's positions are kept with
X's trained state.

What trains: low-rank adapters (LoRA: W x + B A x, B = 0 at the start, A drawn from a seeded
generator) on the attention and MLP projections of the last `layers` blocks, with Adam. The layers
below stay frozen and need no backward pass, and give the same output at every step: a block costs
one forward of the whole window, `steps` - 1 forwards of the adapted blocks alone (from what entered
them at the first step, where a probe shows that this reproduces the whole forward bit for bit),
and `steps` backwards through the adapted blocks and the head. The weights of the model are never
changed: the adapters live beside it and act only while this mode runs (under the engine's lock).

Determinism: every block is computed alone, in order, from seeded initial adapters, so the same
dataset gives the same bits on the same machine, torch build and number of torch threads (the
backward pass's sums over a block's positions are split by thread; the forward passes are
batch-invariant as in `context` mode); distributed workers configured alike that recompute a
state get the same one. The state after a prefix (adapters and Adam moments, a few
MB) is kept in a byte-bounded LRU, so a matrix row or many Ys train on X once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from models.batching import window_spans
from models.lm import Joined, LMCompressor, token_ids
from models.memory import CopyIndex, RecentDigests, mix_caches
from models.ngram import NGramIndex, NGramParams
from models.protocol import Progress, Segment, SegmentBits, Symbols

log = logging.getLogger(__name__)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LN2 = math.log(2.0)
HEAD_CHUNK = 512  # positions per chunk of the training loss: bounds the logits held at once


@dataclass(frozen=True)
class AdaptParams(NGramParams):
    """The stated, fixed parameters of `adapt` mode (see the module docstring)."""

    layers: int  # LoRA in the last `layers` transformer blocks
    rank: int
    lr: float  # Adam's learning rate
    steps: int = 1  # optimizer steps per block
    replay: int = 0  # more training passes over X's blocks after coding X, before Y is coded
    seed: int = 0
    order: int = 0  # the copy model's context in tokens (0: no copy model), as in `memory` mode
    copy_bias: float = 0.0  # α
    copy_length: float = 0.0  # β, the weight of ln(tokens the copy has matched)
    copy_max: float = 0.9999  # μ_max

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "blocks": "the scored part of each sliding window, cut where X ends and Y begins",
            "trains": f"LoRA rank {self.rank} on {', '.join(TARGETS)} of the last {self.layers} blocks",
            "optimizer": f"Adam, learning rate {self.lr}, {self.steps} step(s) per block, mean cross-entropy",
            "after_x": (
                f"Y is coded by the model trained on all of X (then {self._replay_text()}), "
                "training on through Y's blocks"
            ),
            "seed": self.seed,
        }
        if self.order:
            out["copy"] = (
                f"mixed with the token after the latest earlier occurrence (anywhere before the window) of "
                f"the last {self.order} tokens, followed while it predicts right"
            )
            weight = f"sigmoid({self.copy_bias} + {self.copy_length} * ln(tokens matched))"
            out["copy_weight"] = f"{self.copy_max} * {weight}"
        return out | self.ngram_description()

    def _replay_text(self) -> str:
        return f"{self.replay} more pass(es) over X's blocks" if self.replay else "no more passes"

    @property
    def key(self) -> str:
        raw = f"{self.layers}:{self.rank}:{self.lr}:{self.steps}:{self.replay}:{self.seed}"
        if self.order:
            raw += f":{self.order}:{self.copy_bias}:{self.copy_length}:{self.copy_max}"
        raw += self.ngram_key()
        return "adapt" + hashlib.sha256(raw.encode()).hexdigest()[:12]


class LoRALinear(nn.Module):
    """A frozen linear layer plus, while `weights` is set, the low-rank update B A x."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base, self.name = base, name
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (A (r, in), B (out, r))

    @property
    def in_features(self) -> int:
        return int(self.base.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.base.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weights is None:
            return out
        a, b = self.weights
        return out + ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)


def attach(body: nn.Module, layers: int) -> list[LoRALinear]:
    """Wrap the TARGETS projections of the last `layers` blocks of `body` (once; later calls find
    the wrappers already there)."""
    blocks = body.layers  # type: ignore[attr-defined]
    wrapped = []
    for index in range(len(blocks) - layers, len(blocks)):
        for parent_name, parent in blocks[index].named_modules():
            for child_name, child in list(parent.named_children()):
                if child_name not in TARGETS:
                    continue
                if not isinstance(child, LoRALinear):
                    child = LoRALinear(child, f"{index}.{parent_name}.{child_name}")
                    setattr(parent, child_name, child)
                wrapped.append(child)
    return wrapped


@dataclass
class AdaptState:
    """Adapters and their optimizer after some blocks, and the bits those blocks cost."""

    params: list[torch.Tensor]  # A_0, B_0, A_1, B_1, ... in the order of the wrapped layers
    optimizer: dict  # torch.optim.Adam state_dict
    bits: float  # code length of what was coded to get here
    copy_state: tuple[int, int] = (-1, 0)  # the copy model after the last token: (pointer, tokens matched)
    tokens: np.ndarray | None = None  # with a copy model or n-gram cache: the tokens coded to get here (int64)
    copy_index: CopyIndex | None = None  # with a copy model: its lookup of those tokens' positions
    ngram_index: NGramIndex | None = None  # with an n-gram cache: its index of those tokens' positions

    @property
    def nbytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.params)
        total += (self.tokens.nbytes if self.tokens is not None else 0) + (
            self.copy_index.nbytes if self.copy_index is not None else 0
        )
        total += self.ngram_index.nbytes if self.ngram_index is not None else 0
        for s in self.optimizer.get("state", {}).values():
            total += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
        return total


class StateCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, AdaptState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> AdaptState | None:
        with self._lock:
            state = self._items.get(digest)
            if state is not None:
                self._items.move_to_end(digest)
            return state

    def put(self, digest: str, state: AdaptState) -> None:
        with self._lock:
            if digest in self._items or state.nbytes > self.max_bytes:
                return
            self._items[digest] = state
            self._bytes += state.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


class AdaptCompressor:
    """The `Compressor` of a language model in `adapt` mode (see the module docstring)."""

    def __init__(self, lm: LMCompressor, params: AdaptParams, cache_bytes: int) -> None:
        self.lm = lm
        self.params = params
        self.cache = StateCache(cache_bytes)
        self.digest = RecentDigests()  # X's digest once for a matrix row's Ys
        self.info = lm.info.with_mode("adapt")
        self._layers = attach(lm.body, params.layers)
        self._blocks = list(lm.body.layers)[-params.layers :]  # type: ignore[attr-defined]
        self._reuse: bool | None = None  # see _reuse_ok
        self.vocab = int(lm.head_weight.shape[0])
        params.check_ngram(self.vocab)

    def encode(self, text: str) -> Symbols:
        return self.lm.encode(text)

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        out = []
        for s in segments:
            if not s.prefix:
                # C(X) through the state after coding X: the same bits, and a later C(Y|X) finds X
                # coded (and adds only the replay passes, if any).
                coded = self.state_after(s.target, progress, replayed=False)
                out.append(SegmentBits(prefix_bits=0.0, target_bits=coded.bits))
                continue
            before = self.state_after(s.prefix, progress)
            bits, _ = self._code(Joined(s.prefix, s.target), len(s.prefix), before, progress, train_last=False)
            out.append(SegmentBits(prefix_bits=before.bits, target_bits=bits))
        return out

    def state_after(self, tokens: Symbols, progress: Progress | None = None, replayed: bool = True) -> AdaptState:
        """The adapters after coding and training on all of `tokens`, then (if `replayed`) the
        `replay` more passes over them that come before whatever follows them (from the cache if
        there). C(X) alone needs only the coded state: the replay passes change no bits of X, so
        they run only when X conditions something."""
        digest = self.digest(tokens)
        if replayed and self.params.replay:
            state = self.cache.get(f"{digest}:replayed")
            if state is None:
                state = self._replay(tokens, self.state_after(tokens, progress, replayed=False), progress)
                self.cache.put(f"{digest}:replayed", state)
            return state
        state = self.cache.get(digest)
        if state is None:
            bits, state = self._code(tokens, 0, None, progress, train_last=True)
            self.cache.put(digest, state)
        return state

    def fresh(self) -> tuple[list[torch.Tensor], dict]:
        """Initial adapters: A seeded, B zero (so the model starts as it is)."""
        generator = torch.Generator().manual_seed(self.params.seed)
        params = []
        for layer in self._layers:
            a = torch.randn(self.params.rank, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
            params += [a.to(self.lm.device), torch.zeros(layer.out_features, self.params.rank, device=self.lm.device)]
        return params, {}

    def _code(
        self,
        tokens: Sequence[int],
        start: int,
        before: AdaptState | None,
        progress: Progress | None,
        train_last: bool = False,
    ) -> tuple[float, AdaptState]:
        """Code tokens[start:] after the state `before` (None: fresh adapters): the adapted LM's
        bits (`lm_bits`) mixed with the copy model (if any). Returns the bits of tokens[start:]
        and the state after them (with `before`'s bits added)."""
        bits, limits, state = self.lm_bits(tokens, start, before, progress, train_last)
        if self.params.order or self.params.ngram_smoothing:
            bits, state = self._mix_caches(tokens, start, limits, bits, before, state)
        total = float(bits.sum())
        state.bits = total + (before.bits if before is not None else 0.0)
        return total, state

    def lm_bits(
        self,
        tokens: Sequence[int],
        start: int = 0,
        before: AdaptState | None = None,
        progress: Progress | None = None,
        train_last: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, AdaptState]:
        """Code tokens[start:] block by block with the adapted LM alone, after the state `before`
        (None: fresh adapters), training after each block (after the last one only if
        `train_last`). Returns each token's bits (float64), how many tokens lie before its
        window (what a copy may follow), and the state after them (bits not set).
        benchmarks/conditioning_fit.py fits the copy model's weights on these."""
        params, optimizer = self._trainable(before)
        spans = self._spans(len(tokens), start)
        # Positions low.. of the start token + tokens: all that the blocks read (a Y after a long
        # X reads the window before Y, so X's other tokens are not converted again for each Y).
        low = spans[0][0] if spans else len(tokens)
        ids = self.lm.with_start(tokens, low).to(self.lm.device)
        blocks: list[torch.Tensor] = [torch.zeros(0, dtype=torch.float64)]
        if progress is not None:
            progress(0, len(tokens) - start)
        with self.lm.lock, self._active(params):
            for k, (a, b, first) in enumerate(spans):
                last = k + 1 == len(spans)
                blocks.append(self._block(ids, a - low, b - low, first - low, optimizer, train=train_last or not last))
                if progress is not None:
                    progress(b - first, 0)
        # A token at position p (the start token's is 0) of window [a, b) may copy from the a - 1 before it.
        limits = [torch.zeros(0, dtype=torch.long)]
        limits += [torch.full((b - first,), max(a - 1, 0), dtype=torch.long) for a, b, first in spans]
        return torch.cat(blocks), torch.cat(limits), self._snapshot(params, optimizer, 0.0)

    def _mix_caches(
        self,
        tokens: Sequence[int],
        start: int,
        limits: torch.Tensor,
        bits: torch.Tensor,
        before: AdaptState | None,
        state: AdaptState,
    ) -> tuple[torch.Tensor, AdaptState]:
        """The bits of tokens[start:] mixed with the copy model's predictions (models/memory.py),
        which follow the latest earlier occurrence of the last `order` tokens before each token's
        window (`limits`), then with the n-gram cache (models/ngram.py), if the parameters have
        them; and `state` with the copy model's state, the tokens, their lookup and their n-gram
        counts (X's are kept with X's state, so a Y after X hashes and sorts only its own positions)."""
        if before is None:
            seq, copy_state, earlier, grams = token_ids(tokens).numpy(), (-1, 0), None, None
        else:  # X's state: it holds X's tokens (`start` of them), their lookup and counts
            assert before.tokens is not None and len(before.tokens) == start
            seq = np.concatenate([before.tokens, token_ids(tokens[start:]).numpy()])
            copy_state, earlier, grams = before.copy_state, before.copy_index, before.ngram_index
        bits, copy_state, index, grams = mix_caches(
            bits, seq, start, limits, self.params, self.vocab, copy_state, earlier, grams
        )
        # The lookup and the index cover this call's positions: all of them only when nothing came before.
        return bits, replace(
            state,
            copy_state=copy_state,
            tokens=seq,
            copy_index=index if start == 0 else None,
            ngram_index=grams if start == 0 else None,
        )

    def _replay(self, tokens: Sequence[int], coded: AdaptState, progress: Progress | None) -> AdaptState:
        """`replay` more training passes over the blocks of `tokens`, from the state after coding
        them: the state that codes what follows them (its bits: those of coding them, unchanged)."""
        params, optimizer = self._trainable(coded)
        spans = self._spans(len(tokens), 0)
        ids = self.lm.with_start(tokens).to(self.lm.device)
        if progress is not None:
            progress(0, len(tokens) * self.params.replay)
        with self.lm.lock, self._active(params):
            for _ in range(self.params.replay):
                for a, b, first in spans:
                    self._block(ids, a, b, first, optimizer, train=True, code=False)
                    if progress is not None:
                        progress(b - first, 0)
        snapshot = self._snapshot(params, optimizer, coded.bits)
        return replace(
            snapshot,
            copy_state=coded.copy_state,
            tokens=coded.tokens,
            copy_index=coded.copy_index,
            ngram_index=coded.ngram_index,
        )

    def _spans(self, n: int, start: int) -> list[tuple[int, int, int]]:
        """The blocks that code tokens[start:] of n tokens: (window start, end, first position
        scored), in positions of the start token + the tokens."""
        spans = window_spans(n + 1, self.lm.window)
        return [(a, b, max(first, start + 1)) for a, b, first in spans if b > start + 1]

    def _trainable(self, before: AdaptState | None) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        """The adapters and their optimizer as they were in `before` (None: fresh), to train on."""
        if before is None:
            values, optimizer_state = self.fresh()
        else:
            values, optimizer_state = [p.clone() for p in before.params], _clone(before.optimizer)
        params = [nn.Parameter(v) for v in values]
        optimizer = torch.optim.Adam(params, lr=self.params.lr, foreach=False)
        if optimizer_state:
            optimizer.load_state_dict(optimizer_state)
        return params, optimizer

    @staticmethod
    def _snapshot(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, bits: float) -> AdaptState:
        return AdaptState(
            params=[p.detach().clone() for p in params], optimizer=_clone(optimizer.state_dict()), bits=bits
        )

    def _block(
        self,
        ids: torch.Tensor,
        a: int,
        b: int,
        first: int,
        optimizer: torch.optim.Optimizer,
        train: bool,
        code: bool = True,
    ) -> torch.Tensor:
        """Code positions [first, b) of window [a, b) with the current adapters (if `code`);
        then, if `train`, take the optimizer steps on them. Returns their bits, (b - first,)
        float64 on the CPU (empty if not `code`)."""
        targets = ids[first:b]
        bits = torch.zeros(0, dtype=torch.float64)
        steps = self.params.steps if train else 1
        below: tuple[torch.Tensor, dict] | None = None  # what enters the first adapted block, from step 0
        for step in range(steps):
            with torch.set_grad_enabled(train):
                if below is None:
                    hidden, below = self._forward(ids[a:b], keep_below=steps > 1 and self._reuse_ok())
                else:
                    hidden = self._adapted_part(*below)
                hidden = hidden[first - 1 - a : b - 1 - a]
            if step == 0 and code:
                bits = self.lm.head_bits(hidden.detach(), targets).to("cpu", torch.float64)
            if not train:
                break
            optimizer.zero_grad(set_to_none=True)
            self._backward_head(hidden, targets)
            optimizer.step()
        return bits

    def _forward(self, ids: torch.Tensor, keep_below: bool) -> tuple[torch.Tensor, tuple[tuple, dict] | None]:
        """The body's final hidden states (n, hidden) of one window, and (if `keep_below`) what
        entered the first adapted block: its arguments (the hidden states, the mask, the rotary
        embeddings). The frozen blocks below it give the same output at every optimizer step of a
        block, so the later steps run the adapted blocks only (`_adapted_part`)."""
        kept: list[tuple[tuple, dict]] = []
        hook = None
        if keep_below:
            hook = self._blocks[0].register_forward_pre_hook(
                lambda _module, args, kwargs: kept.append((args, kwargs)), with_kwargs=True
            )
        try:
            out = self.lm.body(
                input_ids=ids[None], position_ids=torch.arange(len(ids), device=ids.device)[None], use_cache=False
            ).last_hidden_state[0]
        finally:
            if hook is not None:
                hook.remove()
        return out, (kept[0] if kept else None)

    def _adapted_part(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The body from its first adapted block on, given the arguments that entered that block:
        the blocks, then the final norm (the tail of the model's forward)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        for block in self._blocks:
            out = block(hidden, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": hidden})
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm.body.norm(hidden)[0]  # type: ignore[attr-defined]

    def _reuse_ok(self) -> bool:
        """Whether `_adapted_part` reproduces the body's forward bit for bit (checked once, on a
        short probe with adapters set): if a model's forward does more after its blocks than the
        final norm, every step runs the whole body instead."""
        if self._reuse is None:
            probe = torch.arange(3, 3 + 16, device=self.lm.device) % len(self.lm.head_weight)
            params, _ = self.fresh()
            params = [p if i % 2 == 0 else torch.full_like(p, 0.01) for i, p in enumerate(params)]  # B ≠ 0
            active = [layer.weights for layer in self._layers]  # the caller's adapters, put back after
            try:
                with torch.no_grad(), _Adapters(self._layers, params):
                    full, below = self._forward(probe, keep_below=True)
                    self._reuse = below is not None and torch.equal(full, self._adapted_part(*below))
            except Exception as exc:  # a model whose blocks are called otherwise: no short cut
                log.info("adapt: every step runs the whole body (%s: %s)", type(exc).__name__, exc)
                self._reuse = False
            finally:
                for layer, weights in zip(self._layers, active, strict=True):
                    layer.weights = weights
        return self._reuse

    def _backward_head(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        """Backward of the mean cross-entropy of the block, a chunk of positions at a time (the
        full logits of a block would take 200 MB for SmolLM2's vocabulary)."""
        detached = hidden.detach().requires_grad_(True)
        weight = self.lm.head_weight
        n = len(targets)
        for i in range(0, n, HEAD_CHUNK):
            logits = self.lm.logits(detached[i : i + HEAD_CHUNK], weight)
            loss = nn.functional.cross_entropy(logits, targets[i : i + HEAD_CHUNK], reduction="sum") / n
            loss.backward()
        hidden.backward(detached.grad)

    def _active(self, params: list[nn.Parameter]) -> _Adapters:
        return _Adapters(self._layers, params)


class _Adapters:
    """Within `with`, the wrapped layers apply these adapters (and gradients reach them)."""

    def __init__(self, layers: list[LoRALinear], params: list[nn.Parameter]) -> None:
        self.layers, self.params = layers, params

    def __enter__(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.weights = (self.params[2 * i], self.params[2 * i + 1])

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.weights = None


def _clone(state: dict) -> dict:
    """A deep copy of an optimizer state dict (tensors cloned)."""
    if not state:
        return {}
    copied = {
        k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in s.items()} for k, s in state["state"].items()
    }
    return {"state": copied, "param_groups": [dict(g) for g in state["param_groups"]]}

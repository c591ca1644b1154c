"""What window scoring costs on top of a plain prefill: time and peak memory.

For each prompt length, the draft prefills the prompt three ways in fresh subprocesses:
plain (the model's own sdpa, no recorder), with SpecPC token scoring (window 64, layers from 8)
and with SpecKV head scoring (window 32 + 64 lookahead queries). Time is the median of
``--repeats`` prefills; peak memory is the growth of the process's peak RSS over its RSS after
loading (on CUDA: ``torch.cuda.max_memory_allocated`` growth). Ratios are against plain.

    python benchmarks/scoring_overhead.py --model qwen2.5-coder-0.5b-instruct --lengths 2048 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "specpc", "speckv")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt_ids(tokenizer, length: int):
    import pydoc_data.topics

    import torch

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length])


def measure(model_name: str, length: int, variant: str, repeats: int, dtype: str) -> dict:
    """Runs in a child process so each variant's peak memory is its own."""
    import torch

    from spec_rag import load_model
    from spec_rag.generation import forward, new_cache
    from spec_rag.scoring import HeadScoreRecorder, TokenScoreRecorder, enable_scoring

    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, dtype=dtype)
    if variant != "plain":
        enable_scoring(model)
    ids = _prompt_ids(tokenizer, length)
    cuda = model.device.type == "cuda"
    layers = model.config.num_hidden_layers

    def recorder():
        if variant == "specpc":
            return TokenScoreRecorder(length - 64, length, layers=range(min(8, layers - 1), layers))
        if variant == "speckv":
            # SpecKV's target prefill: 32 window queries + 64 lookahead queries over the prompt.
            return HeadScoreRecorder(length - 96, length - 64)
        return None

    forward(model, ids[None, :256], new_cache(model))  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        cache = new_cache(model)
        start = time.perf_counter()
        forward(model, ids[None], cache, recorder=recorder())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del cache
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    return {"length": length, "variant": variant, "seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.model, int(args.child[0]), args.child[1], args.repeats, args.dtype)
        print(json.dumps(result))
        return

    rows = []
    for length in args.lengths:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats)]
            cmd += ["--dtype", args.dtype, "--child", str(length), variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"measured {variant} at {length} tokens", file=sys.stderr)

    print(f"\nmodel {args.model}, dtype {args.dtype}, median of {args.repeats} prefills\n")
    print("| tokens | variant | prefill s | time vs plain | peak MiB over load | memory vs plain |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        plain = next(r for r in rows if r["length"] == length and r["variant"] == "plain")
        for r in (r for r in rows if r["length"] == length):
            mib = r["peak_bytes"] / 2**20
            print(
                f"| {length} | {r['variant']} | {r['seconds']:.3f} | {r['seconds'] / plain['seconds']:.3f}x "
                f"| {mib:.0f} | {r['peak_bytes'] / max(plain['peak_bytes'], 1):.3f}x |"
            )


if __name__ == "__main__":
    main()

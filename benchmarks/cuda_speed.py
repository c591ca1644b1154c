"""Every method on a CUDA device: end-to-end seconds and peak GPU memory per request, as ratios
against full context in the same run.

    python benchmarks/cuda_speed.py --lengths 8192 32768 65536
    python benchmarks/cuda_speed.py --random-weights DIR_OF_TARGET_CONFIG DIR_OF_DRAFT_CONFIG

``--random-weights`` builds both models from their ``config.json`` with random weights (the
tokenizer comes from the target's folder): a machine that cannot reach the weights still times
the real architectures. Every method then writes exactly ``--max-new-tokens`` tokens (a random
model hardly ever emits its end token), so the times compare like for like; answers are noise
and are not scored. Peak memory is the CUDA allocator's high-water mark during the request,
above the weights already resident. A length past the target's window runs only the methods
that compress the prompt (SpecPC, SpecKV-PC); the draft then scores it in chunks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from spec_rag import ContextLengthError, SpecEngine, config_for_method
from spec_rag.bench import TASKS, generate_sample, render_prompt
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET
from spec_rag.profiling import PeakMemory, release_memory

PROMPT_METHODS = ("specpc", "speckv-pc")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_pair(target_dir: str, draft_dir: str, dtype: torch.dtype, device: str) -> tuple[Any, Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    models = []
    for folder in (target_dir, draft_dir):
        config = AutoConfig.from_pretrained(folder)
        torch.manual_seed(0)
        with torch.device(device):
            models.append(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
    return models[0], models[1], tokenizer


def weights_gib(model: Any) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--methods", nargs="+", default=["full", "speckv", "snapkv", "specpc", "speckv-pc"])
    parser.add_argument("--kv-budget", type=int, default=1024)
    parser.add_argument("--prompt-budget", type=int, default=2048)
    parser.add_argument("--task", default="niah_single_2", choices=list(TASKS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--random-weights", nargs=2, metavar=("TARGET_DIR", "DRAFT_DIR"))
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON lines here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark times the GPU path (see spec-rag bench for the CPU)")

    if args.random_weights:
        target, draft, tokenizer = random_pair(*args.random_weights, torch.bfloat16, args.device)
        base = SpecEngine(target, tokenizer, draft)
    else:
        base = SpecEngine.from_pretrained(args.target, args.draft, device=args.device)
    window = base.target.config.max_position_embeddings
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"{name}: target {weights_gib(base.target):.2f} GiB, "
        f"draft {weights_gib(base.draft):.2f} GiB of weights, {base.target.dtype}, "
        f"attention {base.target.config._attn_implementation}, torch {torch.__version__}",
        flush=True,
    )
    engines = {}
    for method in args.methods:  # full ignores the budgets
        fields = {"max_capacity_prompt": args.prompt_budget if method == "specpc" else args.kv_budget}
        if method == "speckv-pc":
            fields["prompt_capacity"] = args.prompt_budget
        engines[method] = base.with_config(config_for_method(method, **fields))

    rows = []
    print(
        f"{'length':>7} {'method':<10} {'seconds':>8} {'x full':>7} {'peak MiB':>9} {'x full':>7} "
        f"{'prefill':>7} {'cache':>6} {'out':>4} {'draft s':>7} {'prefill s':>9} {'decode s':>8}"
    )
    for length in args.lengths:
        prompt = render_prompt(generate_sample(args.task, length, 0, 0, base.tokenizer), base.tokenizer)
        full: dict[str, float] = {}
        for method, engine in engines.items():
            if length > window and method not in PROMPT_METHODS:
                continue
            times, peaks = [], []
            for attempt in range(args.repeats + 1):  # the first is a warm-up at this length
                release_memory()
                with PeakMemory(args.device) as peak:
                    sync(args.device)
                    start = time.perf_counter()
                    try:
                        out = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
                    except ContextLengthError as error:
                        print(f"{length:>7} {method:<10} refused: {error}")
                        break
                    sync(args.device)
                    elapsed = time.perf_counter() - start
                if attempt:
                    times.append(elapsed)
                    peaks.append(peak.peak / 2**20)
            if not times:
                continue
            seconds, mib = statistics.median(times), max(peaks)
            if method == "full":
                full = {"seconds": seconds, "mib": mib}
            ratio = f"{seconds / full['seconds']:.2f}" if full else "-"
            mratio = f"{mib / full['mib']:.2f}" if full else "-"
            s = out.stats
            print(
                f"{s.prompt_tokens:>7} {method:<10} {seconds:>8.3f} {ratio:>7} {mib:>9.0f} {mratio:>7} "
                f"{s.target_prefill_tokens:>7} {s.kv_cache_tokens:>6} {s.output_tokens:>4} "
                f"{s.draft_s:>7.2f} {s.target_prefill_s:>9.2f} {s.decode_s:>8.2f}",
                flush=True,
            )
            rows.append(dict(length=length, method=method, seconds=times, peak_mib=mib, stats=s.to_dict()))
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()

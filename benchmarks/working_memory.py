"""Working memory of one request per method and prompt length, each in a fresh process.

    nice -n 10 python benchmarks/working_memory.py --lengths 4096 8192 \\
        --methods full snapkv streamingllm speckv specpc speckv-pc

Per (method, length) a new Python process loads the models the method needs (the target; the
draft too when the method uses one), makes their weights resident by summing every parameter
tensor (weights loaded from safetensors are memory-mapped: pages not yet read would otherwise
show up as growth during the request), runs one warm-up request on a short prompt per model,
and records its resident set size (RSS) as the baseline. It then runs one request, a RULER-style
sample of the given length (``--task``), and reports:

* ``working``: peak RSS during the request minus the baseline, what the request itself needs;
* ``peak``: the process's peak RSS during the request, the models' weights included (a method
  with a draft pays the draft's weights here; full loads no draft);
* the weights' sizes (target, draft) and the ratios of both figures to full's at that length.

The peak is the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), reset just before
the request by writing ``5`` to ``/proc/self/clear_refs``: it sees every page the process ever
had resident, however short-lived, which sampling can miss. Where that file is not writable,
a thread samples RSS every millisecond instead (a lower bound); the ``peak from`` column says
which was used.

The workers run with glibc's mmap threshold fixed (``--mmap-threshold``, default 128 KiB, through
``MALLOC_MMAP_THRESHOLD_``), so every tensor of 128 KiB or more gets pages of its own, returned
to the system when the tensor is freed: the peak then counts the tensors alive at once. With
glibc's default the threshold rises after each large free, up to 32 MiB, and blocks below it stay
in the heap once freed; the same request's peak then depends on the order of allocations (the
same full request on SmolLM2 at 4k measured 161 and 274 MiB in two fresh processes, 133 MiB
with the threshold fixed). ``--mmap-threshold 0`` keeps glibc's default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spec_rag.config import PREFILL_CHUNK_SIZE

MIB = 1024 * 1024
METHODS = ("full", "snapkv", "streamingllm", "speckv", "specpc", "speckv-pc")


# -- the worker: one request in this process -------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; ``False`` if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class RssSampler:
    """Samples RSS in a thread (the fallback when ``VmHWM`` cannot be reset)."""

    interval_s: float = 0.001
    peak: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from spec_rag.profiling import rss_bytes

        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def weight_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def make_resident(model: Any) -> None:
    """Read every parameter and buffer once, so memory-mapped weights are paged in."""
    import torch

    with torch.inference_mode():
        for tensor in [*model.parameters(), *model.buffers()]:
            float(tensor.sum(dtype=torch.float32) if tensor.is_floating_point() else tensor.sum())


def engine_config(method: str, args: argparse.Namespace) -> Any:
    from spec_rag.config import config_for_method

    if method == "full":
        return None
    if method == "specpc":
        return config_for_method(method, max_capacity_prompt=args.prompt_budget)
    if method == "speckv-pc":
        budgets = {"max_capacity_prompt": args.kv_budget, "prompt_capacity": args.prompt_budget}
        return config_for_method(method, **budgets)
    return config_for_method(method, max_capacity_prompt=args.kv_budget)


def measure(method: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One request of ``method`` at ``length`` tokens, in this process (see the module's doc)."""
    from spec_rag import SpecEngine, get_model
    from spec_rag.bench import generate_sample, render_prompt, score_answer
    from spec_rag.config import method_info
    from spec_rag.profiling import release_memory, rss_bytes

    target, tokenizer = get_model(args.target, dtype=args.dtype)
    draft, draft_tokenizer = (None, None)
    if method_info(method).needs_draft:
        draft, draft_tokenizer = get_model(args.draft, dtype=args.dtype)
    for model in (target, draft):
        if model is not None:
            make_resident(model)
    chunk = args.prefill_chunk_size or None  # 0: one pass
    config = engine_config(method, args)
    engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config, prefill_chunk_size=chunk)
    sample = generate_sample(args.task, length, args.seed, 0, tokenizer)
    prompt = render_prompt(sample, tokenizer)
    max_new_tokens = sample.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    # Warm-up: one short request per model pays the one-time allocations (thread pools, kernels).
    engine.generate("Hello", max_new_tokens=2)
    if draft is not None:
        SpecEngine(draft, draft_tokenizer).generate("Hello", max_new_tokens=2)
    release_memory()
    base = rss_bytes()
    exact = reset_peak()
    with RssSampler() as sampler:
        start = time.perf_counter()
        answer = engine.generate(prompt, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024 if exact else max(sampler.peak, rss_bytes())
    peak = max(peak, sampler.peak)
    return {
        "method": method,
        "length": length,
        "prompt_tokens": answer.stats.prompt_tokens,
        "target_prefill_tokens": answer.stats.target_prefill_tokens,
        "kv_cache_tokens": answer.stats.kv_cache_tokens,
        "target_weights": weight_bytes(target),
        "draft_weights": 0 if draft is None else weight_bytes(draft),
        "base_rss": base,
        "peak_rss": peak,
        "working": peak - base,
        "peak_from": "VmHWM" if exact else "sampled",
        "prefill_chunk_size": chunk,
        "seconds": seconds,
        # where the request's time went (the engine's own split of ``seconds``)
        "draft_s": answer.stats.draft_s,
        "target_prefill_s": answer.stats.target_prefill_s,
        "decode_s": answer.stats.decode_s,
        "output_tokens": answer.stats.output_tokens,
        "lookahead_tokens": answer.stats.lookahead_tokens,
        "lookahead_accepted": answer.stats.lookahead_accepted,
        "score": score_answer(answer.text, sample.answers, sample.metric),
        "cpu_s": _cpu_seconds(),  # the whole process: loading, warm-up and the request
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the driver: a fresh process per row ---------------------------------------------------------------
def run_fresh(method: str, length: int, argv: list[str], mmap_threshold: int = 0) -> dict[str, Any]:
    """:func:`measure` in a new Python process; its last output line is the row as JSON.
    ``mmap_threshold`` (bytes, 0: glibc's default) is the worker's ``MALLOC_MMAP_THRESHOLD_``."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method, str(length)]
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at {length} failed:\n{done.stderr[-4000:]}")
    row = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    row["mmap_threshold"] = mmap_threshold
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with ratios to full's row at the same length."""
    full = {r["length"]: r for r in rows if r["method"] == "full"}
    lines = [
        "| method | length | prompt | target prefill | cache | working MiB | x full | peak RSS MiB | x full "
        "| base RSS MiB | target / draft weights MiB | s | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = full.get(r["length"])
        ratio = f"{r['working'] / ref['working']:.2f}" if ref and ref["working"] > 0 else "-"
        total = f"{r['peak_rss'] / ref['peak_rss']:.2f}" if ref else "-"
        lines.append(
            f"| {r['method']} | {r['length']} | {r['prompt_tokens']} | {r['target_prefill_tokens']} "
            f"| {r['kv_cache_tokens']} | {r['working'] / MIB:.0f} | {ratio} | {r['peak_rss'] / MIB:.0f} "
            f"| {total} | {r['base_rss'] / MIB:.0f} | {r['target_weights'] / MIB:.0f} / "
            f"{r['draft_weights'] / MIB:.0f} | {r['seconds']:.1f} | {r['score']:.2f} |"
        )
    return "\n".join(lines)


def below_full(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per method, the shortest measured length from which its peak RSS (weights included) stays
    below full's at every longer measured length (``None``: not at the longest)."""
    full = {r["length"]: r["peak_rss"] for r in rows if r["method"] == "full"}
    since: dict[str, int | None] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        mine = sorted((r["length"], r["peak_rss"]) for r in rows if r["method"] == method)
        start: int | None = None
        for length, peak in mine:
            if length in full:
                start = (length if start is None else start) if peak < full[length] else None
        since[method] = start
    return since


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default=None, help="default: the Qwen pair's target")
    parser.add_argument("--draft", default=None, help="default: the Qwen pair's draft")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-budget", type=int, default=1024, help="cache budget of the KV methods")
    parser.add_argument("--prompt-budget", type=int, default=2048, help="SpecPC's, SpecKV-PC's prompt budget")
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's answer budget")
    parser.add_argument(
        "--prefill-chunk-size", type=int, default=PREFILL_CHUNK_SIZE, help="the engines' (0: one pass)"
    )
    parser.add_argument(
        "--mmap-threshold", type=int, default=128 * 1024, help="workers' glibc mmap threshold (0: default)"
    )
    parser.add_argument("--json", help="also append the rows to this file, one JSON object a line")
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE", help="print the table of rows saved by --json; run nothing"
    )
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        lines = [line for path in args.from_json for line in Path(path).read_text().splitlines()]
        report([json.loads(line) for line in lines if line.strip()])
        return
    if args.target is None or args.draft is None:
        from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

        args.target = args.target or DEFAULT_TARGET
        args.draft = args.draft or DEFAULT_DRAFT
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args)), flush=True)
        return

    argv = ["--task", args.task, "--seed", str(args.seed), "--target", str(args.target)]
    argv += ["--draft", str(args.draft), "--dtype", args.dtype, "--kv-budget", str(args.kv_budget)]
    argv += ["--prompt-budget", str(args.prompt_budget), "--prefill-chunk-size", str(args.prefill_chunk_size)]
    if args.max_new_tokens is not None:
        argv += ["--max-new-tokens", str(args.max_new_tokens)]
    methods = sorted(args.methods, key=lambda m: m != "full")  # full first: the ratios' reference
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        for method in methods:
            row = run_fresh(method, length, argv, args.mmap_threshold)
            rows.append(row)
            print(
                f"{method} @ {length}: working {row['working'] / MIB:.0f} MiB, peak RSS "
                f"{row['peak_rss'] / MIB:.0f} MiB ({row['peak_from']}), {row['seconds']:.1f} s, "
                f"process CPU {row['cpu_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    print(table(rows))
    print()
    for method, length in below_full(rows).items():
        where = f"from {length} tokens" if length is not None else "not at the longest length measured"
        print(f"{method}: peak RSS (weights included) below full's {where}")


if __name__ == "__main__":
    main()

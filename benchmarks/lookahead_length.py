"""SpecKV's accuracy and cost against the lookahead's length ``n``, on the benchmark's samples.

    python benchmarks/lookahead_length.py --length 4096 --indices 0 --budget 512 \\
        --lengths 8 16 32 max --out docs/results-lookahead/samples.jsonl

Per sample the draft writes its greedy answer once, at the task's answer budget (``max``); a
greedy draft's ``n``-token lookahead is that answer's first ``n`` tokens, so each shorter ``n``
is scored from a prefix of it (``engine.score(prompt, lookahead=ids[:n])``), exactly what a
standalone run with ``lookahead_tokens=n`` scores, without writing the draft's answer again. The
target then answers greedily from the ``budget``-entry cache, with the verified lookahead on (the
default). Each row holds the harness score, the target's scoring prefill time, how many lookahead
tokens the target accepted and how many decode steps the answer took.

The draft's own cost per ``n`` is measured once per run on the first sample (its prefill, then
the time per lookahead token), since scoring from prefixes does not pay it per ``n``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spec_rag import SpecEngine, SpecKVConfig
from spec_rag.bench import TASKS, generate_sample, render_prompt, score_answer
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET
from spec_rag.specpc import draft_pass


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--lengths", nargs="+", default=["8", "16", "32", "max"], help="n values; 'max' = the task's"
    )
    parser.add_argument("--budget", type=int, default=512, help="SpecKV's cache budget")
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, help="append one JSON line per (sample, n) here")
    parser.add_argument("--no-draft-timing", action="store_true", help="skip timing the draft")
    args = parser.parse_args()

    config = SpecKVConfig(max_capacity_prompt=args.budget, window_size=args.window_size)
    engine = SpecEngine.from_pretrained(args.target, args.draft, config, dtype=args.dtype)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    totals: dict[str, list[float]] = {}
    timed_draft = args.no_draft_timing
    for task in args.tasks:
        for index in args.indices:
            sample = generate_sample(task, args.length, args.seed, index, engine.tokenizer)
            prompt = render_prompt(sample, engine.tokenizer)
            if not timed_draft:
                time_draft(engine, prompt, sample.max_new_tokens)
                timed_draft = True
            scored = engine.score(prompt, max_new_tokens=sample.max_new_tokens)
            lookahead = scored.lookahead
            for label in args.lengths:
                n = sample.max_new_tokens if label == "max" else min(int(label), sample.max_new_tokens)
                t0 = time.perf_counter()
                this = scored if n >= len(lookahead) else engine.score(prompt, lookahead=lookahead[:n])
                score_s = time.perf_counter() - t0 if this is not scored else scored.stats.target_prefill_s
                answer = engine.generate_from(this, budget=args.budget, max_new_tokens=sample.max_new_tokens)
                value = score_answer(answer.text, sample.answers, sample.metric)
                row = {
                    "task": task,
                    "index": index,
                    "length": args.length,
                    "n": label,
                    "lookahead_tokens": min(n, len(lookahead)),
                    "budget": args.budget,
                    "score": value,
                    "accepted": answer.stats.lookahead_accepted,
                    "output_tokens": answer.stats.output_tokens,
                    "target_scoring_s": round(score_s, 3),
                    "decode_s": round(answer.stats.decode_s, 3),
                    "answer": answer.text,
                }
                totals.setdefault(label, []).append(value)
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
    print("\nmean score by n:")
    for label, values in totals.items():
        print(f"  n={label:>4}: {100 * sum(values) / len(values):5.1f}  ({len(values)} samples)")


def time_draft(engine: SpecEngine, prompt: str, n: int) -> None:
    """The draft's prefill time and its time per lookahead token, on one prompt."""
    ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    assert engine.draft is not None
    draft_pass(engine.draft, ids, lookahead_tokens=1, eos_token_ids=[])  # warm-up
    t0 = time.perf_counter()
    draft_pass(engine.draft, ids, lookahead_tokens=1, eos_token_ids=[])
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    draft_pass(engine.draft, ids, lookahead_tokens=n, eos_token_ids=[])
    per_token = (time.perf_counter() - t0 - prefill) / max(n - 1, 1)
    print(
        f"draft: prefill of {ids.numel()} tokens {prefill:.2f} s, {per_token:.3f} s per lookahead token",
        flush=True,
    )


if __name__ == "__main__":
    main()

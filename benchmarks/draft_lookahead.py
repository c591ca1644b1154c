"""Does the draft's lookahead already hold the answer? Per sample, next to SpecKV's score.

    python benchmarks/draft_lookahead.py --task niah_multikey_3 --length 4096 \\
        --indices 0 1 2 3 4 5 6 7 8 9 --results docs/results-4k/samples.jsonl --budget 512

SpecKV keeps the KV entries that the draft's approximate answer (the lookahead) attends to. When
the draft answers with the wrong fact, its attention points at the wrong part of the prompt, and
the target may lose the right one. This script runs the draft only (no target): it builds the
benchmark's samples, writes the lookahead exactly as the accuracy harness does (greedy, the
task's answer budget), and reports whether each expected answer is in it. With ``--results`` it
also prints the score SpecKV got on that sample in an accuracy run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spec_rag import SpecPC, SpecPCConfig, get_model
from spec_rag.bench.methods import _encode
from spec_rag.bench.tasks import TASKS, generate_sample, render_prompt
from spec_rag.models import DEFAULT_DRAFT


def speckv_scores(path: Path, task: str, length: int, budget: int) -> dict[int, float]:
    """SpecKV's score per sample index, from an accuracy run's JSON lines."""
    scores = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if (row["task"], row["length"], row["method"], row["budget"]) == (task, length, "speckv", budget):
            scores[row["index"]] = row["score"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="niah_multikey_3", choices=list(TASKS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", type=Path, help="an accuracy run's samples.jsonl")
    parser.add_argument("--budget", type=int, default=512, help="SpecKV budget to read from --results")
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    scores = speckv_scores(args.results, args.task, args.length, args.budget) if args.results else {}
    draft, tokenizer = get_model(args.draft, dtype=args.dtype)
    compressor = SpecPC(draft, tokenizer, SpecPCConfig())
    right = 0
    for index in args.indices:
        sample = generate_sample(args.task, args.length, args.seed, index, tokenizer)
        encoded = _encode(tokenizer, render_prompt(sample, tokenizer))
        _, lookahead = compressor.score_tokens(encoded.ids, generate_tokens=sample.max_new_tokens)
        text = tokenizer.decode(lookahead)
        found = [answer.lower() in text.lower() for answer in sample.answers]
        right += all(found)
        speckv = f"  speckv@{args.budget} {scores[index]:.2f}" if index in scores else ""
        shown = text.strip()[:80]
        line = f"{sample.id}  draft has {sum(found)}/{len(found)} answers{speckv}  lookahead {shown!r}"
        print(line, flush=True)
    print(f"\ndraft's lookahead holds every answer in {right} of {len(args.indices)} samples")


if __name__ == "__main__":
    main()

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

import json
from pathlib import Path

from _draft_only import draft_samples, sample_parser

from spec_rag import SpecPCConfig
from spec_rag.bench import score_answer


def speckv_scores(path: Path, task: str, length: int, budget: int) -> dict[int, float]:
    """SpecKV's score per sample index, from an accuracy run's JSON lines."""
    scores = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if (row["task"], row["length"], row["method"], row["budget"]) == (task, length, "speckv", budget):
            scores[row["index"]] = row["score"]
    return scores


def main() -> None:
    parser = sample_parser(__doc__, "niah_multikey_3")
    parser.add_argument("--results", type=Path, help="an accuracy run's samples.jsonl")
    parser.add_argument("--budget", type=int, default=512, help="SpecKV budget to read from --results")
    args = parser.parse_args()

    scores = speckv_scores(args.results, args.task, args.length, args.budget) if args.results else {}
    right = 0
    for compressor, sample, encoded in draft_samples(args, SpecPCConfig()):
        _, lookahead = compressor.score_tokens(encoded.ids, generate_tokens=sample.max_new_tokens)
        text = compressor.tokenizer.decode(lookahead, skip_special_tokens=True)
        found = sum(score_answer(text, [answer], "all") == 1.0 for answer in sample.answers)  # harness match
        right += found == len(sample.answers)
        speckv = f"  speckv@{args.budget} {scores[sample.index]:.2f}" if sample.index in scores else ""
        shown = text.strip()[:80]
        line = f"{sample.id}  draft has {found}/{len(sample.answers)} answers{speckv}  lookahead {shown!r}"
        print(line, flush=True)
    print(f"\ndraft's lookahead holds every answer in {right} of {len(args.indices)} samples")


if __name__ == "__main__":
    main()

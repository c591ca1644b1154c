"""Which expected answers survive SpecPC's cut, per sample and budget.

    python benchmarks/specpc_retention.py --task niah_multivalue --length 4096 --indices 0 1 2 3 4 5

A prompt method can miss an answer in two ways: the compression dropped the fact, or the target
had it and answered wrong. This script measures the first alone (no target model runs): it
builds the benchmark's samples (sized with the draft's tokenizer; the default pair shares
one), scores each prompt once with the draft (the harness's SpecPC
settings), cuts it at every ``--budgets`` value and checks which expected answers are still
in the kept text. It also finds the smallest budget (in steps of ``--step`` tokens) that keeps
them all. ``--kernels 64 32 16`` compares pool widths (each with as many neighbour tokens) on
the same draft pass.
"""

from __future__ import annotations

import functools
import time

import torch
from _draft_only import draft_samples, sample_parser

from spec_rag import SpecPCConfig
from spec_rag.bench import EncodedPrompt, Sample, kept_text
from spec_rag.scoring import pool_scores
from spec_rag.specpc import select_tokens


def answers_kept(
    sample: Sample, encoded: EncodedPrompt, scores: torch.Tensor, cfg: SpecPCConfig, budget: int
) -> list[bool]:
    """For each expected answer: is it in the prompt text SpecPC keeps at ``budget``?

    Encoding, selection and the kept text are the harness's own (``spec_rag.bench.methods``),
    so this measures exactly what the accuracy run's SpecPC rows fed the target."""
    kept = select_tokens(scores, budget, cfg, encoded.special)
    text = kept_text(encoded, kept).lower()
    return [answer.lower() in text for answer in sample.answers]


def main() -> None:
    parser = sample_parser(__doc__, "niah_multivalue")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 1536, 2048])
    parser.add_argument("--step", type=int, default=64)
    parser.add_argument(
        "--kernels",
        type=int,
        nargs="+",
        default=[SpecPCConfig().kernel_size],
        help="pool widths to compare, each with neighbor_tokens equal to it (one draft pass serves all)",
    )
    args = parser.parse_args()

    configs = {k: SpecPCConfig(kernel_size=k, neighbor_tokens=k) for k in args.kernels}
    kept_share: dict[tuple[int, int], list[float]] = {(k, b): [] for k in configs for b in args.budgets}
    for compressor, sample, encoded in draft_samples(args, SpecPCConfig()):
        ids = encoded.ids
        start = time.perf_counter()
        raw, _ = compressor.score_tokens(ids)
        draft_s = time.perf_counter() - start
        for kernel, cfg in configs.items():
            scores = pool_scores(raw, cfg.kernel_size, cfg.pool_type)
            survivors = functools.partial(answers_kept, sample, encoded, scores, cfg)
            row = []
            for budget in args.budgets:
                found = survivors(budget)
                kept_share[(kernel, budget)].append(sum(found) / len(found))
                row.append(f"{budget}: {sum(found)}/{len(found)}")
            steps = range(cfg.window_size, ids.numel() + args.step, args.step)
            smallest = next((b for b in steps if all(survivors(b))), None)
            label = f"  kernel {kernel}" if len(configs) > 1 else ""
            print(
                f"{sample.id}{label}  {ids.numel()} tokens  draft {draft_s:.1f}s  kept answers  "
                f"{'  '.join(row)}  smallest budget keeping all: {smallest}",
                flush=True,
            )
    print("\nshare of expected answers in the kept text, mean over samples:")
    for (kernel, budget), shares in kept_share.items():
        label = f"kernel {kernel:>3}  " if len(configs) > 1 else ""
        print(f"  {label}budget {budget:>5}: {sum(shares) / len(shares):.3f}")


if __name__ == "__main__":
    main()

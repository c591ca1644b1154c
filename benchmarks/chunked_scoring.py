"""SpecPC scored in chunks against the same prompt scored whole, where both fit the draft.

    python benchmarks/chunked_scoring.py --tasks niah_single_2 vt --length 8192 --chunk-size 2048 \
        --indices 0 1 --target qwen2.5-coder-1.5b-instruct

For each sample the draft scores the prompt once whole and once in chunks of ``--chunk-size``
tokens (each chunk: the prompt's first tokens, one slice, the last ``window_size`` tokens),
merged by the plain maximum and by the maximum of per-chunk normalised scores. At every
``--budgets`` value it prints which expected answers survive each cut and how many kept
positions the chunked cut shares with the whole one; with ``--target`` the target also answers
from each cut (at the first budget) and the answer is scored as the accuracy harness does.

``--answer-lookahead`` compares SpecKV-PC's scoring instead: the whole prompt scored with the
sample's answer budget as lookahead (SpecKV-PC's whole pass), against chunks scored with that
lookahead (``chunk-answer``) and with SpecPC's one-token lookahead (``chunk-1``, what the
library's chunks use).
"""

from __future__ import annotations

import time

import torch
from _draft_only import sample_parser

from spec_rag import SpecEngine, SpecPC, SpecPCConfig, get_model
from spec_rag.bench import TASKS, encode_tokens, generate_sample, kept_text, render_prompt
from spec_rag.bench.tasks import score_answer
from spec_rag.specpc import select_tokens


def main() -> None:
    parser = sample_parser(__doc__, "niah_single_2")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--target", default=None, help="also answer from each cut with this target")
    parser.add_argument("--answer-lookahead", action="store_true", help="compare SpecKV-PC's chunk lookahead")
    args = parser.parse_args()

    draft, tokenizer = get_model(args.draft, dtype=args.dtype)
    whole = SpecPC(draft, tokenizer, SpecPCConfig())
    chunked = SpecPC(draft, tokenizer, SpecPCConfig(chunk_size=args.chunk_size))
    target = None
    if args.target:
        target = SpecEngine(*get_model(args.target, dtype=args.dtype))
    totals: dict[str, list[float]] = {}
    for task in args.tasks or [args.task]:
        for index in args.indices:
            sample = generate_sample(task, args.length, args.seed, index, tokenizer)
            encoded = encode_tokens(tokenizer, render_prompt(sample, tokenizer))
            ids = encoded.ids
            n = sample.max_new_tokens if args.answer_lookahead else SpecPCConfig().lookahead_tokens
            start = time.perf_counter()
            variants = {"whole": whole.smooth(whole.score_tokens(ids, lookahead_tokens=n)[0])}
            times = {"whole": time.perf_counter() - start}
            slices = chunked.chunk_slices(ids.numel(), n)
            chunk_variants = (("chunk-max", False, n, slices), ("chunk-norm", True, n, slices))
            if args.answer_lookahead:  # chunk-1: what SpecKV-PC does (slices sized for one token)
                chunk_variants = (
                    ("chunk-answer", False, n, slices),
                    ("chunk-1", False, 1, chunked.scoring_slices(ids.numel(), n)),
                )
            counts = {name: len(variant_slices) for name, _, _, variant_slices in chunk_variants}
            for name, normalise, lookahead, variant_slices in chunk_variants:
                start = time.perf_counter()
                raw = chunked.score_chunks(ids, variant_slices, lookahead, normalise=normalise)
                variants[name] = chunked.smooth(raw)
                times[name] = time.perf_counter() - start
            print(
                f"{sample.id}  {ids.numel()} tokens  chunks: "
                + "  ".join(f"{k} {v}" for k, v in counts.items())
                + "  draft s: "
                + "  ".join(f"{k} {v:.1f}" for k, v in times.items()),
                flush=True,
            )
            cuts = {}
            for budget in args.budgets:
                row = []
                for name, scores in variants.items():
                    kept = select_tokens(scores, budget, whole.config, encoded.special)
                    cuts[(name, budget)] = kept
                    text = kept_text(encoded, kept).lower()
                    found = [a.lower() in text for a in sample.answers]
                    share = sum(found) / len(found)
                    totals.setdefault(f"{name} kept answers @{budget}", []).append(share)
                    same = len(set(kept.tolist()) & set(cuts[("whole", budget)].tolist())) / kept.numel()
                    totals.setdefault(f"{name} shared with whole @{budget}", []).append(same)
                    row.append(f"{name} {sum(found)}/{len(found)} (shared {same:.2f})")
                print(f"  budget {budget}: " + "  ".join(row), flush=True)
            if target is not None:
                budget = args.budgets[0]
                row = []
                for name in variants:
                    prompt = kept_text(encoded, cuts[(name, budget)])
                    answer = target.generate(prompt, max_new_tokens=sample.max_new_tokens).text
                    right = score_answer(answer, sample.answers, sample.metric)
                    totals.setdefault(f"{name} target score @{budget}", []).append(right)
                    row.append(f"{name} {right:.2f} {answer.strip()[:40]!r}")
                print(f"  target @{budget}: " + "  ".join(row), flush=True)
    print("\nmeans over samples:")
    for key, values in totals.items():
        print(f"  {key}: {sum(values) / len(values):.3f} (n={len(values)})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

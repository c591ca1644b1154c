"""SpecKV with and without the verified lookahead, per sample: how many draft tokens the target
accepted, time, and the harness score.

    python benchmarks/verified_lookahead.py --task niah_multikey_3 --length 4096 --indices 0 1 2 \\
        --budget 512

Both runs are greedy unless ``--temperature`` is above 0 (then both sample, each sample's answer
seeded with its index). With verification, the target's scoring prefill checks the draft's
lookahead: the agreeing prefix plus the target's next token open the answer, exactly as
full-cache greedy decoding writes them (sampled: drawn as full-cache sampling draws them), and
cost no decode step. ``accepted`` is that prefix's
length, ``share`` its part of the lookahead; ``same`` says whether the two answers are equal
(they need not be: the verified opening is the full-cache one, plain SpecKV decodes it on the
compressed cache). ``--full`` also answers each prompt with full context (the same target, the
same sampling and seed, in the same process), for each method's time as a ratio of full's.
"""

from __future__ import annotations

import argparse

from spec_rag import SpecEngine, SpecKVConfig
from spec_rag.bench import TASKS, generate_sample, render_prompt, score_answer
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--task", default="niah_multikey_3", choices=list(TASKS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--budget", type=int, default=512, help="SpecKV's cache budget")
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--lookahead-tokens", type=int, help="default: the task's answer length")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--full", action="store_true", help="also time full context on each prompt")
    args = parser.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p}

    config = SpecKVConfig(
        max_capacity_prompt=args.budget, window_size=args.window_size, lookahead_tokens=args.lookahead_tokens
    )
    verified = SpecEngine.from_pretrained(args.target, args.draft, config, dtype=args.dtype)
    plain = verified.with_config(config.model_copy(update={"verify_lookahead": False}))
    full = SpecEngine(verified.target, verified.tokenizer) if args.full else None
    first = generate_sample(args.task, args.length, args.seed, args.indices[0], verified.tokenizer)
    engines = (verified, plain) if full is None else (verified, plain, full)
    for engine in engines:  # warm-up: the first call in a process pays one-time costs
        engine.generate(render_prompt(first, verified.tokenizer), max_new_tokens=2)
    totals = dict.fromkeys(["verified_s", "plain_s", "full_s", "verified", "plain", "full"], 0.0)
    totals.update(accepted=0, lookahead=0)
    for index in args.indices:
        sample = generate_sample(args.task, args.length, args.seed, index, verified.tokenizer)
        prompt = render_prompt(sample, verified.tokenizer)
        on = verified.generate(prompt, max_new_tokens=sample.max_new_tokens, seed=index, **sampling)
        off = plain.generate(prompt, max_new_tokens=sample.max_new_tokens, seed=index, **sampling)
        score_on = score_answer(on.text, sample.answers, sample.metric)
        score_off = score_answer(off.text, sample.answers, sample.metric)
        accepted, n = on.stats.lookahead_accepted, on.stats.lookahead_tokens
        totals["accepted"] += accepted
        totals["lookahead"] += n
        totals["verified_s"] += on.stats.total_s
        totals["plain_s"] += off.stats.total_s
        totals["verified"] += score_on
        totals["plain"] += score_off
        line = (
            f"{sample.id}  prompt {on.stats.prompt_tokens}  accepted {accepted}/{n} "
            f"({accepted / max(n, 1):.0%})  verified {on.stats.total_s:.2f} s score {score_on:.2f}  "
            f"plain {off.stats.total_s:.2f} s score {score_off:.2f}  same {on.token_ids == off.token_ids}"
        )
        if full is not None:
            whole = full.generate(prompt, max_new_tokens=sample.max_new_tokens, seed=index, **sampling)
            score_full = score_answer(whole.text, sample.answers, sample.metric)
            totals["full_s"] += whole.stats.total_s
            totals["full"] += score_full
            line += f"  full {whole.stats.total_s:.2f} s score {score_full:.2f}"
        print(line, flush=True)
    count = len(args.indices)
    share = totals["accepted"] / max(int(totals["lookahead"]), 1)
    print(
        f"\naccepted {int(totals['accepted'])} of {int(totals['lookahead'])} lookahead tokens ({share:.0%}); "
        f"time verified {totals['verified_s']:.2f} s vs plain {totals['plain_s']:.2f} s "
        f"({totals['verified_s'] / max(totals['plain_s'], 1e-9):.2f}x); mean score verified "
        f"{totals['verified'] / count:.3f} vs plain {totals['plain'] / count:.3f}"
    )
    if full is not None:
        base = max(totals["full_s"], 1e-9)
        print(
            f"full context {totals['full_s']:.2f} s, mean score {totals['full'] / count:.3f}; verified "
            f"{totals['verified_s'] / base:.2f}x full, plain {totals['plain_s'] / base:.2f}x full"
        )


if __name__ == "__main__":
    main()

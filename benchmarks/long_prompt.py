"""One benchmark sample longer than the draft's window, answered by SpecPC: time, peak RSS, right?

    python benchmarks/long_prompt.py --task niah_single_2 --length 65536 --budget 2048 --chunk-size 16384

The draft scores the prompt in chunks (``chunk_size``, at most its window) and the target sees
only the compressed prompt. Peak RSS is the process's high-water mark (``ru_maxrss``), printed
beside the RSS once both models are loaded, so the request's own growth is their difference.
"""

from __future__ import annotations

import argparse
import resource
import time

from spec_rag import SpecEngine, SpecKVConfig, SpecKVPCConfig, SpecPCConfig
from spec_rag.bench import TASKS, generate_sample, render_prompt, score_answer
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="niah_single_2", choices=list(TASKS))
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--budget", type=int, default=2048, help="SpecPC prompt budget")
    parser.add_argument("--cache-budget", type=int, default=None, help="run SpecKV-PC with this cache budget")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the draft's window")
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    specpc = SpecPCConfig(max_capacity_prompt=args.budget, chunk_size=args.chunk_size)
    config: SpecPCConfig | SpecKVPCConfig = specpc
    if args.cache_budget is not None:
        config = SpecKVPCConfig(
            specpc=specpc.model_copy(update={"kernel_size": 32, "neighbor_tokens": 32}),
            speckv=SpecKVConfig(max_capacity_prompt=args.cache_budget),
        )
    engine = SpecEngine.from_pretrained(args.target, args.draft, config, dtype=args.dtype)
    sample = generate_sample(args.task, args.length, 0, args.index, engine.tokenizer)
    prompt = render_prompt(sample, engine.tokenizer)
    loaded = rss_gib()
    start = time.perf_counter()
    out = engine.generate(prompt, max_new_tokens=sample.max_new_tokens)
    seconds = time.perf_counter() - start
    right = score_answer(out.text, sample.answers, sample.metric)
    stats = out.stats
    print(
        f"{sample.id} {config.method}: {stats.prompt_tokens} prompt tokens -> {stats.target_prefill_tokens}"
    )
    print(f"  answer {out.text.strip()!r}  expected {list(sample.answers)}  score {right:.2f}")
    print(
        f"  total {seconds:.1f} s (draft {stats.draft_s:.1f}, target prefill {stats.target_prefill_s:.1f}, "
        f"decode {stats.decode_s:.1f})"
    )
    print(f"  RSS with both models loaded {loaded:.2f} GiB, peak during the request {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()

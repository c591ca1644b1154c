"""Soak test: many sequential and concurrent requests on one engine; RSS growth and errors.

    python benchmarks/soak.py --requests 200 --threads 8

RSS is read after a warm-up of ``--warmup`` requests, first one by one and then from
``--threads`` threads (allocator and caches settled), after the sequential phase and after the
concurrent phase. Every answer is checked against the same
prompt's answer when run alone (greedy), so cross-talk between threads counts as an error.
"""

from __future__ import annotations

import argparse
import random
import time
from concurrent.futures import ThreadPoolExecutor

from spec_rag import SpecEngine, config_for_method, get_model
from spec_rag.profiling import rss_bytes
from spec_rag.retrieval import BM25, python_reference_sections, rag_messages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="speckv")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer = get_model(args.model)
    engine = SpecEngine(
        model,
        tokenizer,
        draft=model,
        draft_tokenizer=tokenizer,
        config=config_for_method(args.method, max_capacity_prompt=args.budget),
    )
    sections = python_reference_sections()
    retriever = BM25([s.text for s in sections])
    questions = [f"What does the {s.metadata['topic']} topic say?" for s in sections[::7]][:40]
    prompts = []
    for q in questions:
        hits = retriever.top(q, 2)
        prompts.append(rag_messages(q, [(sections[i].title, sections[i].text[:700]) for i in hits]))

    def answer(i: int) -> str:
        return engine.generate(prompts[i % len(prompts)], max_new_tokens=args.max_new_tokens).text

    expected = [answer(i) for i in range(len(prompts))]  # also the warm-up
    for i in range(args.warmup):
        answer(i)
    # Warm the concurrent path too: each thread's first requests grow the allocator's per-thread
    # arenas once; a leak is growth beyond that steady state.
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(answer, range(args.warmup)))
    rss_start = rss_bytes()
    errors = 0
    start = time.perf_counter()
    for i in range(args.requests):
        try:
            errors += answer(i) != expected[i % len(prompts)]
        except Exception:  # a soak counts every failure
            errors += 1
    sequential_s = time.perf_counter() - start
    rss_sequential = rss_bytes()

    order = list(range(args.requests))
    random.Random(0).shuffle(order)

    def checked(i: int) -> int:
        try:
            return int(answer(i) != expected[i % len(prompts)])
        except Exception:
            return 1

    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        concurrent_errors = sum(pool.map(checked, order))
    concurrent_s = time.perf_counter() - start
    rss_end = rss_bytes()

    mib = 2**20
    print(f"model {args.model}, method {args.method}, budget {args.budget}, {len(prompts)} distinct prompts")
    print(f"sequential: {args.requests} requests in {sequential_s:.1f} s, errors {errors}")
    print(
        f"concurrent ({args.threads} threads): {args.requests} requests in {concurrent_s:.1f} s, "
        f"errors {concurrent_errors}"
    )
    print(
        f"RSS after warm-up {rss_start / mib:.0f} MiB, after sequential {rss_sequential / mib:.0f} MiB, "
        f"after concurrent {rss_end / mib:.0f} MiB"
    )
    print(
        f"RSS growth after warm-up: sequential {100 * (rss_sequential / rss_start - 1):+.1f}%, "
        f"total {100 * (rss_end / rss_start - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()

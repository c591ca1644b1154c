"""``python -m spec_rag.bench accuracy|speed|report``; :func:`add_bench_parser` mounts the same
commands under ``spec-rag bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from spec_rag._commands import BENCH_HELP, run_command
from spec_rag.bench.methods import METHOD_NAMES
from spec_rag.bench.runner import DEFAULT_KV_BUDGETS, DEFAULT_PROMPT_BUDGETS, Models, iter_budgets
from spec_rag.bench.tasks import TASKS
from spec_rag.errors import InvalidInputError

DEFAULT_OUT = "bench-results"


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _models(args: argparse.Namespace) -> Models:
    return Models(target=args.target, draft=args.draft or None, dtype=args.dtype)


def _harness_options(args: argparse.Namespace) -> dict[str, Any]:
    specpc = None
    if args.specpc_kernel is not None:
        from spec_rag import SpecPCConfig

        specpc = SpecPCConfig(kernel_size=args.specpc_kernel, neighbor_tokens=args.specpc_kernel)
    return {
        "specpc": specpc,
        "cascade_factor": args.cascade_factor,
        "share_specpc": not args.no_share_specpc,
        "share_prefill": not args.no_share_prefill,
        "max_new_tokens": args.max_new_tokens,
    }


def cmd_accuracy(args: argparse.Namespace) -> int:
    from spec_rag.bench.runner import run_accuracy

    _set_threads(args)
    kv = args.budgets or args.kv_budgets
    prompt = args.budgets or args.prompt_budgets
    if args.endpoint_model and not args.endpoint:
        raise InvalidInputError(
            "--endpoint-model goes with --endpoint URL (the server's OpenAI-compatible root)."
        )
    if args.endpoint:
        return _accuracy_through_endpoint(args, list(iter_budgets(prompt)))
    path = run_accuracy(
        tasks=args.tasks,
        lengths=args.lengths,
        methods=args.methods or list(METHOD_NAMES),
        samples=args.samples,
        seed=args.seed,
        models=_models(args),
        out_dir=args.out,
        kv_budgets=list(iter_budgets(kv)),
        prompt_budgets=list(iter_budgets(prompt)),
        harness_options=_harness_options(args),
        progress=not args.quiet,
    )
    print(f"answers: {path}\nreport:  {path.parent / 'results.md'}")
    return 0


def _accuracy_through_endpoint(args: argparse.Namespace, prompt_budgets: list[int]) -> int:
    from spec_rag.bench.endpoint import ENDPOINT_METHODS, Endpoint, run_endpoint_accuracy

    if not args.endpoint_model:
        raise InvalidInputError(
            f"--endpoint needs --endpoint-model, the name the server serves (GET {args.endpoint}/models)."
        )
    specpc = _harness_options(args)["specpc"]
    path = run_endpoint_accuracy(
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        seed=args.seed,
        models=_models(args),
        endpoint=Endpoint(args.endpoint, args.endpoint_model, api_key=args.api_key),
        out_dir=args.out,
        methods=args.methods or list(ENDPOINT_METHODS),
        prompt_budgets=prompt_budgets,
        specpc=specpc,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    print(f"answers: {path}\nreport:  {path.parent / 'results.md'}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from spec_rag.bench.runner import run_speed

    _set_threads(args)
    path = run_speed(
        lengths=args.lengths,
        methods=args.methods,
        models=_models(args),
        out_dir=args.out,
        kv_budget=args.kv_budget,
        prompt_budget=args.prompt_budget,
        task=args.task,
        repeats=args.repeats,
        seed=args.seed,
        harness_options=_harness_options(args),
        progress=not args.quiet,
    )
    print(f"measurements: {path}\nreport:       {path.parent / 'results.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spec_rag.bench.report import write_report

    print(write_report(args.out, include=args.include, samples=args.samples, budgets=args.budgets))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    parser.add_argument(
        "--draft", default=DEFAULT_DRAFT, help=f"draft model (default {DEFAULT_DRAFT}; '' for none)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cascade-factor",
        type=int,
        default=2,
        help="SpecKV-PC keeps this many times its cache budget as prompt tokens (default 2)",
    )
    parser.add_argument(
        "--specpc-kernel",
        type=int,
        default=None,
        help="SpecPC's pool width and neighbour tokens, both (default 64, the paper's Qwen setting); "
        "keep-random's spans follow it. Write runs with another width to their own --out",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is often faster on a busy shared CPU)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap every task's answer budget (default: each task's own, 16-64 tokens)",
    )
    parser.add_argument(
        "--no-share-specpc",
        action="store_true",
        help="run SpecPC inside the engine per budget instead of one draft pass per sample",
    )
    parser.add_argument(
        "--no-share-prefill",
        action="store_true",
        help="run full, SpecKV, SnapKV and StreamingLLM in the engine per budget instead of "
        "serving them all from one target prefill per sample",
    )


def _own_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: bfloat16 where the device computes it natively, else float32), "
        "bfloat16, float32 or float16",
    )


def add_bench_parser(
    subparsers: Any, common: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """Add ``bench`` with its ``accuracy``, ``speed`` and ``report`` commands to ``subparsers``.

    ``common`` is a parent parser holding ``--quiet``, ``--debug`` and ``--dtype`` (spec-rag's
    CLI passes its own); without it the commands define those flags themselves.
    """
    bench = subparsers.add_parser("bench", help=BENCH_HELP)
    _add_commands(bench, common)
    return bench


def _add_commands(bench: argparse.ArgumentParser, common: argparse.ArgumentParser | None) -> None:
    parents = [common] if common is not None else []
    commands = bench.add_subparsers(dest="bench_command", required=True)

    accuracy = commands.add_parser(
        "accuracy", parents=parents, help="answer seeded task samples with every method and budget"
    )
    accuracy.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK")
    accuracy.add_argument("--lengths", nargs="+", type=int, default=[2048], help="prompt lengths in tokens")
    accuracy.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHOD_NAMES),
        metavar="METHOD",
        help="default: all of them; with --endpoint: full and specpc (the only two a server can run)",
    )
    accuracy.add_argument("--samples", type=int, default=3, help="samples per task and length (default 3)")
    accuracy.add_argument(
        "--budgets", nargs="+", type=int, default=None, help="one budget list for all methods"
    )
    accuracy.add_argument("--kv-budgets", nargs="+", type=int, default=list(DEFAULT_KV_BUDGETS))
    accuracy.add_argument("--prompt-budgets", nargs="+", type=int, default=list(DEFAULT_PROMPT_BUDGETS))
    accuracy.add_argument(
        "--endpoint",
        default=None,
        metavar="URL",
        help="answer through this OpenAI-compatible server (e.g. http://localhost:8000/v1): the draft "
        "compresses here, the server answers; --target then names the served model's tokenizer, which "
        "sizes the samples and counts the budgets (prompt tokens the server reads)",
    )
    accuracy.add_argument(
        "--endpoint-model", default=None, metavar="NAME", help="the name the server serves the model under"
    )
    accuracy.add_argument(
        "--api-key", default=None, help="the endpoint's API key (default: $OPENAI_API_KEY, else EMPTY)"
    )
    _common(accuracy)
    accuracy.set_defaults(func=cmd_accuracy)

    speed = commands.add_parser("speed", parents=parents, help="latency and memory per method vs length")
    speed.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    speed.add_argument(
        "--methods",
        nargs="+",
        default=["full", "speckv", "snapkv", "streamingllm", "speckv-pc", "specpc"],
        choices=list(METHOD_NAMES),
        metavar="METHOD",
    )
    speed.add_argument("--kv-budget", type=int, default=512, help="budget of the KV methods (default 512)")
    speed.add_argument(
        "--prompt-budget", type=int, default=1024, help="budget of the prompt methods (default 1024)"
    )
    speed.add_argument("--task", default="niah_single_2", choices=list(TASKS))
    speed.add_argument("--repeats", type=int, default=1)
    _common(speed)
    speed.set_defaults(func=cmd_speed)

    report = commands.add_parser("report", parents=parents, help="rewrite results.md and plots from DIR")
    report.add_argument("--out", default=DEFAULT_OUT)
    report.add_argument(
        "--include",
        nargs="+",
        default=[],
        metavar="DIR",
        help="also report these directories' records (e.g. a run with another --specpc-kernel)",
    )
    report.add_argument(
        "--samples", type=int, default=None, help="only the first N sample indices of each task (default all)"
    )
    report.add_argument(
        "--budgets", nargs="+", type=int, default=None, help="only these budgets, and full (default all)"
    )
    report.set_defaults(func=cmd_report)

    if common is None:
        for parser in (accuracy, speed, report):
            _own_flags(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spec_rag.bench", description="spec-rag benchmarks.")
    _add_commands(parser, None)
    return run_command(parser.parse_args(argv), "spec-rag bench")


if __name__ == "__main__":
    sys.exit(main())

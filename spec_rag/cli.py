"""The ``spec-rag`` command: ``demo``, ``compress``, ``generate`` and ``models``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from spec_rag._commands import BENCH_HELP, run_command

DEFAULT_QUESTION = "What does the nonlocal statement do, and where can it be used?"


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, name: str) -> tuple[Any, Any]:
    from spec_rag import models

    if name in models.PACKS:
        _log(args, f"loading {name} ...")
        models.fetch_pack(name, progress=not args.quiet)
    return models.get_model(name, dtype=args.dtype)


# -- demo ---------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from spec_rag import SpecEngine, SpecKVConfig, SpecPC, SpecPCConfig
    from spec_rag.profiling import PeakMemory, kv_cache_bytes, release_memory
    from spec_rag.retrieval import BM25, python_reference_sections, rag_messages

    question = args.question.strip()
    sections = python_reference_sections()
    retriever = BM25([f"{s.title}\n{s.text}" for s in sections])
    hits = [sections[i] for i in retriever.top(question, args.top_k)]
    _log(args, f"retrieved {len(hits)} of {len(sections)} sections of the Python language reference")

    target, tokenizer = _load(args, args.target)
    draft, draft_tokenizer = _load(args, args.draft)
    pc = SpecPC(draft, draft_tokenizer, SpecPCConfig(max_capacity_prompt=args.budget))
    # SpecPC's one draft pass cuts the prompt; with --kv-budget the target's cache is cut too
    # (SpecKV, which costs the draft a second pass to write its lookahead).
    config = None if not args.kv_budget else SpecKVConfig(max_capacity_prompt=args.kv_budget)
    engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config)
    label = "spec-rag (SpecPC)" if config is None else "spec-rag (SpecPC + SpecKV)"

    # One token through each model first, so neither timed run pays for warm-up.
    engine.with_config(None).generate("Hello", max_new_tokens=1)
    SpecEngine(draft, draft_tokenizer).generate("Hello", max_new_tokens=1)

    _log(args, f"compressing with SpecPC and answering with {label} ...")
    release_memory()
    with PeakMemory(target.device) as peak:
        start = time.perf_counter()
        parts = pc.compress_documents(question, [h.text for h in hits])
        compress_s = time.perf_counter() - start
        kept = [(hits[p.index].title, p.text) for p in parts if p.kept_tokens]
        answer = engine.generate(rag_messages(question, kept), max_new_tokens=args.max_new_tokens)
    rows = [
        _Row(label, answer.stats, compress_s, kv_cache_bytes(target, answer.stats.kv_cache_tokens), peak.peak)
    ]

    if not args.no_compare:
        _log(args, "answering the same question with the full context ...")
        full = engine.with_config(None)
        messages = rag_messages(question, [(h.title, h.text) for h in hits])
        release_memory()
        with PeakMemory(target.device) as peak:
            baseline = full.generate(messages, max_new_tokens=args.max_new_tokens)
        stats = baseline.stats
        rows.append(
            _Row("full context", stats, 0.0, kv_cache_bytes(target, stats.kv_cache_tokens), peak.peak)
        )

    print(f"\nQuestion: {question}\n")
    print(f"Answer ({args.target}, guided by {args.draft}):\n{answer.text.strip()}\n")
    print("Sources (tokens kept by SpecPC):")
    for part in parts:
        print(
            f"  [{part.index + 1}] {hits[part.index].title}: {part.kept_tokens}/{part.original_tokens} tokens"
        )
    if not args.no_compare:
        print(f"\nFull-context answer:\n{baseline.text.strip()}")
    print()
    print(_table(rows))
    return 0


class _Row(NamedTuple):
    name: str
    stats: Any
    extra_draft_s: float
    kv_bytes: int
    peak_bytes: int


def _table(rows: Sequence[_Row]) -> str:
    """Stages in seconds; ``KV MiB`` is the target's prompt cache while decoding; ``peak MiB`` is
    the most memory the run took above the loaded models (sampled RSS on a CPU, allocator peak
    on CUDA)."""
    header = (
        "| run | target prompt tokens | KV entries kept | KV MiB | peak MiB "
        "| draft s | target prefill s | decode s | total s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s, extra_draft_s, kv_bytes, peak_bytes in rows:
        lines.append(
            f"| {name} | {s.target_prefill_tokens} | {s.kv_cache_tokens} | {kv_bytes / 2**20:.1f} "
            f"| {peak_bytes / 2**20:.0f} | {s.draft_s + extra_draft_s:.1f} | {s.target_prefill_s:.1f} "
            f"| {s.decode_s:.1f} | {s.total_s + extra_draft_s:.1f} |"
        )
    return "\n".join(lines)


# -- compress -----------------------------------------------------------------------------------
def cmd_compress(args: argparse.Namespace) -> int:
    from spec_rag import InvalidInputError, SpecPC, SpecPCConfig

    documents: list[str] = []
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            documents.append(f.read())
    if not args.files:
        text = sys.stdin.read()
        documents = [d for d in text.split(args.separator)] if args.separator else [text]
    if not documents:
        raise InvalidInputError("no documents: pass files, or text on standard input.")
    draft, tokenizer = _load(args, args.draft)
    pc = SpecPC(draft, tokenizer, SpecPCConfig(max_capacity_prompt=args.budget))
    parts = pc.compress_documents(args.query, documents)
    if args.json:
        names = args.files or [f"<stdin {i}>" for i in range(len(documents))]
        payload = {
            "query": args.query,
            "max_capacity_prompt": args.budget,
            "documents": [
                {
                    "index": p.index,
                    "source": names[p.index],
                    "text": p.text,
                    "score": round(p.score, 6),
                    "original_tokens": p.original_tokens,
                    "kept_tokens": p.kept_tokens,
                    "ratio": round(p.ratio, 6),
                }
                for p in parts
            ],
        }
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(p.text for p in parts if p.kept_tokens))
    return 0


# -- generate -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from spec_rag import InvalidInputError, SpecEngine, config_for_method

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    fields: dict[str, Any] = {}
    if args.budget is not None:
        fields["max_capacity_prompt"] = args.budget
    try:
        config = config_for_method(args.method, **fields)
    except ValueError as err:
        raise InvalidInputError(str(err)) from err
    if args.prefill_chunk_size < 0:
        raise InvalidInputError(
            f"--prefill-chunk-size must be a positive number of tokens, or 0 for one pass "
            f"(got {args.prefill_chunk_size})."
        )
    target, tokenizer = _load(args, args.target)
    draft = draft_tokenizer = None
    if args.method not in ("full", "snapkv", "streamingllm"):
        draft, draft_tokenizer = _load(args, args.draft)
    chunk = args.prefill_chunk_size or None
    engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config, prefill_chunk_size=chunk)
    messages = [{"role": "user", "content": prompt}] if args.chat else prompt
    stream = engine.stream(
        messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    if stream.generation is not None and not args.quiet:
        print(json.dumps(stream.generation.stats.to_dict()), file=sys.stderr)
    return 0


# -- models -------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from spec_rag import models

    if args.action == "list":
        for pack in models.list_packs():
            flags = ("installed" if pack["installed"] else "not installed") + (
                ", fetched" if pack["fetched"] else ""
            )
            print(f"{pack['name']:32} {flags:26} {pack['description']}")
        return 0
    if not args.name:
        raise SystemExit(f"spec-rag models {args.action}: give a pack name (see 'spec-rag models list')")
    print(models.fetch_pack(args.name, progress=not args.quiet, install=args.action == "fetch"))
    return 0


def build_parser(*, bench: bool = True) -> argparse.ArgumentParser:
    """The ``spec-rag`` parser; ``bench=False`` lists ``bench`` without importing the benchmark."""
    from spec_rag.config import DEFAULT_METHOD, METHODS, PREFILL_CHUNK_SIZE
    from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: bfloat16 where the device computes it natively, else float32), "
        "bfloat16, float32 or float16",
    )

    parser = argparse.ArgumentParser(
        prog="spec-rag", description="Draft-based approximate inference for RAG."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="answer a question over the Python reference")
    demo.add_argument("--question", default=DEFAULT_QUESTION)
    demo.add_argument(
        "--top-k", type=int, default=24, help="sections retrieved (default 24: about 8k tokens of context)"
    )
    demo.add_argument("--budget", type=int, default=2048, help="SpecPC prompt budget (default 2048)")
    demo.add_argument(
        "--kv-budget", type=int, default=0, help="also cut the target's cache to this many entries (SpecKV)"
    )
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--target", default=DEFAULT_TARGET)
    demo.add_argument("--draft", default=DEFAULT_DRAFT)
    demo.add_argument("--no-compare", action="store_true", help="skip the full-context run")
    demo.set_defaults(func=cmd_demo)

    compress = sub.add_parser("compress", parents=[common], help="compress documents for a query")
    compress.add_argument("files", nargs="*", help="document files (default: standard input)")
    compress.add_argument("--query", required=True)
    compress.add_argument("--budget", type=int, default=1024)
    compress.add_argument("--draft", default=DEFAULT_DRAFT)
    compress.add_argument("--separator", default=None, help="split standard input into documents on this")
    compress.add_argument("--json", action="store_true", help="per-document JSON with scores and counts")
    compress.set_defaults(func=cmd_compress)

    generate = sub.add_parser("generate", parents=[common], help="answer a prompt with a method")
    generate.add_argument("prompt", help="the prompt, or - for standard input")
    generate.add_argument(
        "--method", default=DEFAULT_METHOD, help=f"one of {', '.join(METHODS)} (default {DEFAULT_METHOD})"
    )
    generate.add_argument("--budget", type=int, default=None, help="max_capacity_prompt")
    generate.add_argument("--target", default=DEFAULT_TARGET)
    generate.add_argument("--draft", default=DEFAULT_DRAFT)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message")
    generate.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=PREFILL_CHUNK_SIZE,
        help=f"read a longer prompt in chunks of this many tokens, which bounds the prefill's memory "
        f"(default {PREFILL_CHUNK_SIZE}; 0: one pass)",
    )
    generate.set_defaults(func=cmd_generate)

    if bench:  # the benchmark package is heavy: imported only to run it
        from spec_rag.bench.__main__ import add_bench_parser

        add_bench_parser(sub, common)
    else:
        sub.add_parser("bench", help=BENCH_HELP, add_help=False)

    models = sub.add_parser("models", parents=[common], help="offline model packs")
    models.add_argument("action", choices=["list", "fetch", "path"])
    models.add_argument("name", nargs="?")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(bench=arguments[:1] == ["bench"]).parse_args(arguments), "spec-rag")


if __name__ == "__main__":
    sys.exit(main())

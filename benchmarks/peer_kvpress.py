"""kvpress, the KV-cache compression library a user would pick instead of SpecKV, on the same prompts.

kvpress 0.5.5 pins ``transformers<5.3``, older than spec-rag's, so it runs in a venv of its own
and this script has three steps; only ``run`` imports kvpress, and it imports nothing of spec-rag:

    # 1. spec-rag's venv: the harness's prompts, tokenised as the engine does, split before the question
    python benchmarks/peer_kvpress.py prepare --length 4096 --indices 0 \
        --results docs/results-4k/samples.jsonl --out /tmp/kvpress-prompts.jsonl
    # 2. a venv with kvpress (torch, transformers 5.2, kvpress and what its modules import)
    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 transformers==5.2.0 \
        accelerate cachetools datasets "fire<0.7" requests
    /tmp/kvenv/bin/pip install --no-deps kvpress==0.5.5
    /tmp/kvenv/bin/python benchmarks/peer_kvpress.py run --prompts /tmp/kvpress-prompts.jsonl \
        --model ~/.cache/spec-rag/models/qwen2.5-coder-1.5b-instruct --dtype float32 --budget 512 \
        --presses snapkv:prompt expected_attention:question expected_attention:prompt \
        --out /tmp/kvpress-answers.jsonl
    # 3. spec-rag's venv: score the answers as the harness does, beside its recorded scores
    python benchmarks/peer_kvpress.py report --prompts /tmp/kvpress-prompts.jsonl \
        --answers /tmp/kvpress-answers.jsonl
    # several prompt files (other --indices) go in one report; --columns picks the rows to compare

``run`` calls kvpress's own pipeline code (``KVPressTextGenerationPipeline._forward``: prefill
under the press, then greedy decoding) on the very tokens spec-rag's engine is fed. A press
``NAME:question`` compresses the prompt up to the question and reads the question afterwards, as
kvpress's pipeline does (question-agnostic compression, its intended use); ``NAME:prompt``
compresses the whole prompt but its last token, question included, as spec-rag's SnapKV and
SpecKV do. Either way the cache keeps ``--budget`` prompt entries, the budget the harness gave
SpecKV, SnapKV and StreamingLLM. ``none`` runs no press (full context, a check of the harness).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

RECORDED = ("full", "speckv", "snapkv", "streamingllm", "speckv-pc", "specpc")


def prepare(args: argparse.Namespace) -> None:
    import hashlib

    from peer_longllmlingua import model_dir
    from transformers import AutoTokenizer

    from spec_rag.bench import encode_tokens, generate_sample, render_prompt
    from spec_rag.models import DEFAULT_TARGET

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir(DEFAULT_TARGET))
    recorded = _recorded(args.results)
    with args.out.open("w") as f:
        for task in args.tasks:
            for index in args.indices:
                sample = generate_sample(task, args.length, args.seed, index, tokenizer)
                text = render_prompt(sample, tokenizer)
                enc = encode_tokens(tokenizer, text)  # as the engine feeds it
                at = enc.text.rfind(sample.question)
                if at < 0:
                    raise SystemExit(f"{sample.id}: the question is not in the rendered prompt")
                split = next(i for i, (start, _) in enumerate(enc.offsets) if start >= at)
                sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
                row = dict(
                    id=sample.id,
                    input_ids=enc.ids.tolist(),
                    question_start=split,
                    max_new_tokens=sample.max_new_tokens,
                    expected=list(sample.answers),
                    metric=sample.metric,
                    recorded=recorded.get((sample.id, sha), {}),
                )
                f.write(json.dumps(row) + "\n")
                print(f"{sample.id}: {enc.ids.numel()} tokens, question from token {split}", flush=True)


def _recorded(path: Path | None) -> dict[tuple[str, str], dict[str, float]]:
    """``(sample id, prompt sha) -> {"method@budget": score}`` from a harness samples.jsonl."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    if path is None:
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["method"] in RECORDED:
            name = row["method"] if row["budget"] is None else f"{row['method']}@{row['budget']}"
            out.setdefault((row["sample_id"], row["prompt_sha256"]), {})[name] = row["score"]
    return out


def run(args: argparse.Namespace) -> None:
    import torch
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    presses: dict[str, Any] = {
        "expected_attention": ExpectedAttentionPress,
        "snapkv": SnapKVPress,
        "knorm": KnormPress,
        "tova": TOVAPress,
        "streamingllm": StreamingLLMPress,
    }
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines()]
    for row in rows:
        ids = torch.tensor(row["input_ids"])
        for spec in args.presses:
            name, _, mode = spec.partition(":")
            split = row["question_start"] if mode == "question" else ids.numel() - 1
            context, question = ids[:split], ids[split:]
            keep = args.budget - question.numel()  # prompt entries in all: the budget
            if name == "none":
                press = None
            elif keep <= 0 or keep >= context.numel():
                raise SystemExit(
                    f"{row['id']}: budget {args.budget} leaves {keep} of {context.numel()} entries"
                )
            else:
                press = presses[name](compression_ratio=1 - keep / context.numel())
            start = time.perf_counter()
            (answer,) = pipe._forward(
                {"context_ids": context[None], "questions_ids": [question[None]]},
                max_new_tokens=row["max_new_tokens"],
                press=press,
            )
            seconds = time.perf_counter() - start
            print(f"{row['id']} {spec}: {answer.strip()[:60]!r} ({seconds:.1f} s)", flush=True)
            with args.out.open("a") as f:
                f.write(
                    json.dumps(dict(id=row["id"], press=spec, budget=args.budget, answer=answer, s=seconds))
                    + "\n"
                )


def report(args: argparse.Namespace) -> None:
    from spec_rag.bench.tasks import score_answer

    prompts = {
        row["id"]: row for path in args.prompts for row in map(json.loads, path.read_text().splitlines())
    }
    scores: dict[str, dict[str, float]] = {}
    for line in args.answers.read_text().splitlines():
        row = json.loads(line)
        prompt = prompts[row["id"]]
        name = f"kvpress {row['press']}@{row['budget']}"
        scores.setdefault(row["id"], dict(prompt["recorded"]))[name] = score_answer(
            row["answer"], prompt["expected"], prompt["metric"]
        )
    columns = sorted({name for row in scores.values() for name in row})
    if args.columns:
        missing = [c for c in args.columns if c not in columns]
        if missing:
            raise SystemExit(f"no such column: {', '.join(missing)}; the columns are: {', '.join(columns)}")
        columns = args.columns
        scores = {sample: row for sample, row in scores.items() if any(c in row for c in columns)}
    print("| sample | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for sample, row in sorted(scores.items()):
        print(f"| {sample} | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in columns) + " |")
    means = []
    for c in columns:  # over the samples every column holds
        values = [row[c] for row in scores.values() if all(k in row for k in columns)]
        means.append(f"**{100 * sum(values) / len(values):.1f}**" if values else "-")
    print("| **mean** | " + " | ".join(means) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="spec-rag's venv: write the harness's prompts as token ids")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every task")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--indices", type=int, nargs="+", default=[0])
    p.add_argument("--results", type=Path, default=None, help="a harness samples.jsonl to compare with")
    p.add_argument("--tokenizer", default=None, help="the target's folder (default: the default target's)")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="kvpress's venv: answer every prompt under every press")
    r.add_argument("--prompts", type=Path, required=True)
    r.add_argument("--model", required=True, help="the target's folder (config, tokenizer, safetensors)")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--budget", type=int, default=512, help="prompt entries the cache keeps")
    r.add_argument("--presses", nargs="+", default=["expected_attention:question", "snapkv:prompt"])
    r.add_argument("--out", type=Path, required=True, help="append one JSON line per answer here")
    s = sub.add_parser("report", help="spec-rag's venv: score the answers beside the recorded ones")
    s.add_argument("--prompts", type=Path, nargs="+", required=True, help="one or more files `prepare` wrote")
    s.add_argument("--answers", type=Path, required=True)
    s.add_argument(
        "--columns",
        nargs="+",
        default=None,
        help="show only these columns, e.g. full speckv@512 'kvpress snapkv:prompt@512' (default: all);"
        " the means are over the samples every shown column holds",
    )
    args = parser.parse_args()
    if args.step == "prepare" and args.tasks is None:
        from spec_rag.bench import TASKS

        args.tasks = list(TASKS)
    {"prepare": prepare, "run": run, "report": report}[args.step](args)


if __name__ == "__main__":
    main()

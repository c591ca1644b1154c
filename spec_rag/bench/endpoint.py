"""Accuracy through an OpenAI-compatible endpoint: SpecPC in front of a served target.

The served model answers every sample through ``/chat/completions`` (vLLM, SGLang, TGI,
llama.cpp's server, ``transformers serve`` or a hosted API); here run only its tokenizer, which
sizes the samples and counts SpecPC's budget, and the draft, which compresses. ``full`` sends the
sample's chat as it is; ``specpc`` sends the same chat with each document cut to what the draft
kept, the documents sharing ``budget`` minus the chat's fixed tokens (template, instruction,
document headers, question) counted in the served model's tokenizer, so the server reads at most
``budget`` prompt tokens. Records go to the same ``samples.jsonl`` and report as the in-process runs; their
``target_prefill_tokens`` are the prompt tokens the server reported reading and ``total_s`` is
the draft's compression (local) plus the request's wall time (server side, network included).

The answer prefix of RULER's tasks is not sent (a chat endpoint cannot start the assistant's
turn for it), so answers may be longer than in-process ones; both contexts are sent alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from spec_rag import SpecPC, SpecPCConfig
from spec_rag._prompt import format_prompt
from spec_rag.bench.records import SAMPLES_FILE, append_jsonl, read_jsonl
from spec_rag.bench.report import write_report
from spec_rag.bench.runner import Models, _check_names, _check_specpc_settings, _key, accuracy_record
from spec_rag.bench.tasks import Document, Sample, generate_sample
from spec_rag.errors import InvalidInputError
from spec_rag.openai_endpoint import answer_through_endpoint

__all__ = ["ENDPOINT_METHODS", "Endpoint", "run_endpoint_accuracy"]

#: What can run in front of a server: SpecKV and the other KV methods need the target's
#: attention and cache, which no serving engine exposes.
ENDPOINT_METHODS = ("full", "specpc")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: its ``/v1`` root and the name it serves the target under."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0

    def client(self) -> Any:
        from openai import OpenAI

        key = self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        return OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=0)


def _empty_documents(sample: Sample) -> tuple[Document, ...]:
    """The sample's documents with their text removed, titles (headers) kept: the chat's fixed part.
    RAG documents with nothing kept are then left out, so the server reads at most the budget."""
    return tuple(Document((), d.joiner, d.title) for d in sample.documents)


def _chat_tokens(tokenizer: Any, sample: Sample, documents: Sequence[Document] | None = None) -> int:
    """Tokens the served model reads for the sample's chat (its template, with the generation prompt)."""
    text = format_prompt(tokenizer, sample.messages(documents))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _compressed_documents(
    specpc: SpecPC, tokenizer: Any, sample: Sample, document_budget: int
) -> tuple[Document, ...]:
    """The sample's documents cut by SpecPC to ``document_budget`` tokens of ``tokenizer``
    together (RAG documents with nothing kept are left out)."""
    parts = specpc.compress_documents(
        sample.question,
        [d.text for d in sample.documents],
        instruction=sample.instruction,
        max_document_tokens=document_budget,
        target_tokenizer=tokenizer,
    )
    return tuple(
        Document((part.text,) if part.text else (), doc.joiner, doc.title)
        for doc, part in zip(sample.documents, parts, strict=True)
        if part.kept_tokens > 0 or not sample.rag
    )


def run_endpoint_accuracy(
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    models: Models,
    endpoint: Endpoint,
    out_dir: str | Path,
    methods: Sequence[str] = ENDPOINT_METHODS,
    prompt_budgets: Sequence[int] = (1024,),
    specpc: SpecPCConfig | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    report: bool = True,
) -> Path:
    """Answer ``samples`` samples of every task and length through ``endpoint``: ``full`` once,
    ``specpc`` at every budget of ``prompt_budgets`` (prompt tokens the server reads).

    ``models.target`` names the served model's tokenizer (loaded alone, offline), ``models.draft``
    SpecPC's draft. Appends to ``out_dir/samples.jsonl`` (keys already there are skipped, so a
    run resumes) and rewrites the report. Returns the JSON-lines path.
    """
    _check_names(tasks, methods)
    wrong = [m for m in methods if m not in ENDPOINT_METHODS]
    if wrong:
        raise InvalidInputError(
            f"through an endpoint only {' and '.join(ENDPOINT_METHODS)} run ({', '.join(wrong)} need the "
            "target's attention or KV cache, which a server does not expose); run them without --endpoint."
        )
    if "specpc" in methods and models.draft is None:
        raise InvalidInputError("specpc needs a draft model; pass --draft.")
    config = specpc or SpecPCConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SAMPLES_FILE
    existing = read_jsonl(path)
    _check_specpc_settings(existing, methods, {"specpc": config})
    done = {r["key"] for r in existing if "key" in r}

    from spec_rag.models import load_tokenizer

    tokenizer = load_tokenizer(models.target)
    served = f"{endpoint.model} (served)"

    def key_of(sample_id: str, sha: str, method: str, budget: int | None) -> str:
        return _key(sample_id, sha, method, budget, served, models.draft if method == "specpc" else None)

    plan: list[tuple[Sample, str, list[tuple[str, int | None]]]] = []
    for index in range(samples):
        for length in lengths:
            for task in tasks:
                sample = generate_sample(task, length, seed, index, tokenizer)
                sha = hashlib.sha256(json.dumps(sample.messages()).encode("utf-8")).hexdigest()
                pending = [
                    (m, b)
                    for m in methods
                    for b in ([None] if m == "full" else list(prompt_budgets))
                    if key_of(sample.id, sha, m, b) not in done
                ]
                if pending:
                    plan.append((sample, sha, pending))
    total = sum(len(p) for _, _, p in plan)
    if not total:
        if report:
            write_report(out)
        return path

    client = endpoint.client()
    # One request first, so the first timed one does not pay for the server's warm-up.
    answer_through_endpoint(
        "Hi", base_url=endpoint.base_url, model=endpoint.model, max_tokens=1, client=client
    )
    compressor: SpecPC | None = None
    bar = tqdm(total=total, desc="accuracy (endpoint)", unit="answer", disable=not progress)
    for sample, sha, pending in plan:
        full_tokens = _chat_tokens(tokenizer, sample)
        fixed_tokens = _chat_tokens(tokenizer, sample, _empty_documents(sample))
        answer_tokens = (
            sample.max_new_tokens if max_new_tokens is None else min(sample.max_new_tokens, max_new_tokens)
        )
        for method, budget in pending:
            bar.set_postfix_str(f"{sample.task}@{sample.length} {method}{'' if budget is None else budget}")
            documents: tuple[Document, ...] | None = None
            draft_s, same_as_full = 0.0, budget is None or budget >= full_tokens
            if not same_as_full:
                assert budget is not None
                if budget <= fixed_tokens:
                    raise InvalidInputError(
                        f"budget {budget} leaves no room for documents: {sample.task}'s chat without "
                        f"its documents takes {fixed_tokens} tokens of {endpoint.model}. Raise the budget."
                    )
                if compressor is None:
                    assert models.draft is not None
                    draft, draft_tokenizer = models.loader()(models.draft)
                    compressor = SpecPC(draft, draft_tokenizer, config)
                    # First-call overheads stay out of the timed compressions.
                    compressor.compress_documents("Why?", ["Because."], max_document_tokens=1)
                start = time.perf_counter()
                documents = _compressed_documents(compressor, tokenizer, sample, budget - fixed_tokens)
                draft_s = time.perf_counter() - start
            reply = answer_through_endpoint(
                sample.messages(documents),
                base_url=endpoint.base_url,
                model=endpoint.model,
                max_tokens=answer_tokens,
                client=client,
            )
            stats: dict[str, Any] = {
                "prompt_tokens": full_tokens,
                "target_prefill_tokens": reply.prompt_tokens,
                "served_prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "kept_tokens": full_tokens
                if documents is None
                else _chat_tokens(tokenizer, sample, documents),
                "request_s": reply.seconds,
                "draft_s": draft_s,
                "total_s": draft_s + reply.seconds,
                "endpoint": endpoint.base_url,
                "same_as_full": same_as_full and method != "full",
            }
            if method == "specpc":
                stats.update(kernel_size=config.kernel_size, neighbor_tokens=config.neighbor_tokens)
            draft = models.draft if method == "specpc" else None
            record = accuracy_record(sample, sha, method, budget, served, draft, reply.text, stats)
            append_jsonl(path, record)
            done.add(record["key"])
            bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return path

"""Resumable benchmark runs.

Every answer becomes one JSON line in ``samples.jsonl`` (accuracy) or ``speed.jsonl`` (speed),
written as soon as it exists, keyed by what determines it (sample, prompt hash, method, budget,
models). A rerun with the same arguments skips every key already present, so an interrupted run
resumes where it stopped and a finished one only rewrites the report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from spec_rag import SpecPCConfig
from spec_rag.bench.methods import DRAFT_METHODS, SPECPC_SHAPED, Harness, SampleContext, method_family
from spec_rag.bench.records import SAMPLES_FILE, SPEED_FILE, append_jsonl, read_jsonl
from spec_rag.bench.report import write_report
from spec_rag.bench.tasks import TASKS, Sample, generate_sample, render_prompt, score_answer
from spec_rag.errors import InvalidInputError
from spec_rag.profiling import PeakMemory, release_memory, rss_bytes

DEFAULT_KV_BUDGETS = (128, 256, 512, 1024)
DEFAULT_PROMPT_BUDGETS = (512, 1024, 2048)

Loader = Callable[[str], tuple[Any, Any]]


@dataclass(frozen=True)
class Models:
    """Names of the models a run uses, and how to load them (loaded only when work is left)."""

    target: str
    draft: str | None = None
    load: Loader | None = None
    dtype: str = "auto"

    def loader(self) -> Loader:
        if self.load is not None:
            return self.load
        from spec_rag.models import get_model

        return lambda name: get_model(name, dtype=self.dtype)


def budgets_for(method: str, kv_budgets: Sequence[int], prompt_budgets: Sequence[int]) -> list[int | None]:
    family = method_family(method)
    if family == "full":
        return [None]
    return list(kv_budgets if family == "kv" else prompt_budgets)


def _key(*parts: object) -> str:
    return json.dumps(parts, separators=(",", ":"))


def accuracy_record(
    sample: Sample,
    sha: str,
    method: str,
    budget: int | None,
    target: str,
    draft: str | None,
    answer: str,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """One accuracy answer as the samples file records it: the sample, the method and budget,
    the models, the answer and its score, and the run's stats."""
    return {
        "key": _key(sample.id, sha, method, budget, target, draft),
        "sample_id": sample.id,
        "task": sample.task,
        "length": sample.length,
        "seed": sample.seed,
        "index": sample.index,
        "prompt_sha256": sha,
        "method": method,
        "budget": budget,
        "target": target,
        "draft": draft,
        "answer": answer,
        "expected": list(sample.answers),
        "metric": sample.metric,
        "score": score_answer(answer, sample.answers, sample.metric),
        "stats": stats,
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_names(tasks: Sequence[str], methods: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidInputError(f"unknown task(s) {', '.join(unknown)}; choose from: {', '.join(TASKS)}")
    for method in methods:
        method_family(method)


def _check_specpc_settings(
    records: Iterable[dict[str, Any]], methods: Sequence[str], options: dict[str, Any]
) -> None:
    """Refuse to add SpecPC-shaped rows to a directory whose rows of the same method used another
    pool width or neighbourhood: resuming would skip them, and the report would average both."""
    config = options.get("specpc") or SpecPCConfig()
    default = SpecPCConfig()
    wanted = (config.kernel_size, config.neighbor_tokens)
    for r in records:
        stats = r.get("stats", {})
        if r.get("method") not in SPECPC_SHAPED or r["method"] not in methods:
            continue
        found = (
            stats.get("kernel_size", default.kernel_size),
            stats.get("neighbor_tokens", default.neighbor_tokens),
        )
        if found != wanted:
            raise InvalidInputError(
                f"the results here ran {r['method']} with kernel_size/neighbor_tokens {found[0]}/{found[1]}, "
                f"this run asks for {wanted[0]}/{wanted[1]}; write to a fresh --out directory to compare."
            )


class _Session:
    """Loads models on first need and builds the harness around them."""

    def __init__(self, models: Models, harness_options: dict[str, Any]) -> None:
        self.models = models
        self.options = harness_options
        self._load = models.loader()
        self.target, self.tokenizer = self._load(models.target)
        self._harness: Harness | None = None
        self._with_draft = False

    def harness(self, need_draft: bool) -> Harness:
        if self._harness is None or (need_draft and not self._with_draft):
            draft = draft_tokenizer = None
            if need_draft:
                if self.models.draft is None:
                    raise InvalidInputError("SpecPC, SpecKV and SpecKV-PC need a draft model; pass --draft.")
                draft, draft_tokenizer = self._load(self.models.draft)
            self._harness = Harness(self.target, self.tokenizer, draft, draft_tokenizer, **self.options)
            self._with_draft = need_draft
        return self._harness


# -- accuracy -----------------------------------------------------------------------------------
def run_accuracy(
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[str],
    samples: int,
    seed: int,
    models: Models,
    out_dir: str | Path,
    kv_budgets: Sequence[int] = DEFAULT_KV_BUDGETS,
    prompt_budgets: Sequence[int] = DEFAULT_PROMPT_BUDGETS,
    harness_options: dict[str, Any] | None = None,
    progress: bool = True,
    report: bool = True,
) -> Path:
    """Answer ``samples`` samples of every task and length with every method and budget.

    Appends to ``out_dir/samples.jsonl`` (skipping keys already there) and rewrites
    ``out_dir/results.md`` and the plots. A method whose budget holds the whole prompt answers
    exactly as ``full`` does, so when ``full`` is run too its answer is reused (``same_as_full``).
    Returns the JSON-lines path.
    """
    _check_names(tasks, methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SAMPLES_FILE
    existing = read_jsonl(path)
    _check_specpc_settings(existing, methods, harness_options or {})
    specpc = (harness_options or {}).get("specpc") or SpecPCConfig()
    done = {r["key"]: r for r in existing if "key" in r}
    session = _Session(models, harness_options or {})
    tokenizer = session.tokenizer
    # Full first, so that methods whose budget holds the whole prompt can reuse its answer.
    order = sorted(methods, key=lambda m: m != "full")

    def key_of(sample_id: str, sha: str, method: str, budget: int | None) -> str:
        draft = models.draft if method in DRAFT_METHODS else None
        return _key(sample_id, sha, method, budget, models.target, draft)

    plan: list[tuple[Sample, str, list[tuple[str, int | None]]]] = []
    for index in range(samples):  # index-major: early results already cover every task
        for length in lengths:
            for task in tasks:
                sample = generate_sample(task, length, seed, index, tokenizer)
                sha = _sha256(render_prompt(sample, tokenizer))
                pending = [
                    (m, b)
                    for m in order
                    for b in budgets_for(m, kv_budgets, prompt_budgets)
                    if key_of(sample.id, sha, m, b) not in done
                ]
                if pending:
                    plan.append((sample, sha, pending))
    total = sum(len(p) for _, _, p in plan)
    bar = tqdm(total=total, desc="accuracy", unit="answer", disable=not progress or total == 0)
    for sample, sha, pending in plan:
        harness = session.harness(any(m in DRAFT_METHODS for m, _ in pending))
        ctx = harness.context(sample)
        prompt_tokens = None
        for method, budget in pending:
            bar.set_postfix_str(f"{sample.task}@{sample.length} {method}{'' if budget is None else budget}")
            full = done.get(key_of(sample.id, sha, "full", None))
            if prompt_tokens is None and full is not None:
                prompt_tokens = full["stats"]["prompt_tokens"]
            if (
                budget is not None
                and full is not None
                and prompt_tokens is not None
                and budget >= prompt_tokens
            ):
                answer, stats = full["answer"], {**full["stats"], "method": method, "same_as_full": True}
                if method in SPECPC_SHAPED:  # recorded as the harness records them, for the report's labels
                    stats.update(kernel_size=specpc.kernel_size, neighbor_tokens=specpc.neighbor_tokens)
            else:
                outcome = harness.run(ctx, method, budget)
                answer, stats = outcome.answer, outcome.stats
            draft = models.draft if method in DRAFT_METHODS else None
            record = accuracy_record(sample, sha, method, budget, models.target, draft, answer, stats)
            append_jsonl(path, record)
            done[record["key"]] = record
            bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return path


# -- speed --------------------------------------------------------------------------------------
def _timed(harness: Harness, ctx: SampleContext, method: str, budget: int | None) -> dict[str, Any]:
    release_memory()
    base = rss_bytes()
    with PeakMemory() as peak:
        start = time.perf_counter()
        outcome = harness.run(ctx, method, budget)
        latency = time.perf_counter() - start
    return {
        "latency_s": latency,
        "peak_rss_growth_bytes": peak.peak,
        "peak_rss_bytes": base + peak.peak,
        "kv_cache_bytes": outcome.stats["kv_cache_bytes"],
        "answer": outcome.answer,
        "score": score_answer(outcome.answer, ctx.sample.answers, ctx.sample.metric),
        "stats": outcome.stats,
    }


def run_speed(
    *,
    lengths: Sequence[int],
    methods: Sequence[str],
    models: Models,
    out_dir: str | Path,
    kv_budget: int = 512,
    prompt_budget: int = 1024,
    task: str = "niah_single_2",
    repeats: int = 1,
    seed: int = 0,
    harness_options: dict[str, Any] | None = None,
    progress: bool = True,
    report: bool = True,
) -> Path:
    """End-to-end latency, KV-cache bytes and peak RSS of each method on one sample per length.

    Every measurement runs the method on its own, as a user would (no prefill or draft pass
    shared), after one untimed warm-up answer. Appends to ``out_dir/speed.jsonl``; ratios
    against ``full`` at the same length are computed in the report.
    """
    _check_names([task], methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPEED_FILE
    existing = read_jsonl(path)
    _check_specpc_settings(existing, methods, harness_options or {})
    done = {r["key"] for r in existing if "key" in r}
    session = _Session(models, {**(harness_options or {}), "share_prefill": False, "share_specpc": False})
    need_draft = any(m in DRAFT_METHODS for m in methods)

    def budget_of(method: str) -> int | None:
        family = method_family(method)
        return None if family == "full" else kv_budget if family == "kv" else prompt_budget

    def key_of(length: int, method: str, repeat: int) -> str:
        draft = models.draft if method in DRAFT_METHODS else None
        return _key("speed", task, seed, length, method, budget_of(method), repeat, models.target, draft)

    plan = [
        (length, method, repeat)
        for length in lengths
        for method in methods
        for repeat in range(repeats)
        if key_of(length, method, repeat) not in done
    ]
    bar = tqdm(total=len(plan), desc="speed", unit="run", disable=not progress or not plan)
    warmed = False
    for length, method, repeat in plan:
        harness = session.harness(need_draft)
        sample = generate_sample(task, length, seed, 0, session.tokenizer)
        if not warmed:  # first-call overheads (allocations, kernel selection) stay out of the timings
            harness.warm_up()
            warmed = True
        bar.set_postfix_str(f"{length} {method}")
        record = {
            "key": key_of(length, method, repeat),
            "task": task,
            "seed": seed,
            "length": length,
            "method": method,
            "budget": budget_of(method),
            "repeat": repeat,
            "target": models.target,
            "draft": models.draft if method in DRAFT_METHODS else None,
            **_timed(harness, harness.context(sample), method, budget_of(method)),
        }
        append_jsonl(path, record)
        bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return path


def iter_budgets(values: Iterable[int]) -> Iterator[int]:
    """Validated budgets (positive integers), in the order given, without repeats."""
    seen: set[int] = set()
    for value in values:
        if value <= 0:
            raise InvalidInputError(f"budgets must be positive token counts (got {value}).")
        if value not in seen:
            seen.add(value)
            yield value

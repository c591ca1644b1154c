"""SpecPC as an engine method: the draft scores the prompt's tokens, the target prefills only
the kept ones and keeps their whole cache. The compressor itself is :class:`spec_rag.SpecPC`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spec_rag._prompt import Prompt, TrustedPrompt, context_window, encode_prompt, is_messages
from spec_rag.config import SpecPCConfig
from spec_rag.errors import ContextLengthError, InvalidInputError
from spec_rag.generation import GenerationStats, Prefilled
from spec_rag.methods.base import AcceptLimit, Method, Models, Request, ScoredPrompt, lookahead_guide
from spec_rag.methods.full import Full
from spec_rag.specpc import SpecPC, check_capacity, tool_structure_tokens


@dataclass
class ScoredTokens(ScoredPrompt):
    """The draft's pass over a prompt: one smoothed score per token of its tokenisation.

    Attributes:
        prompt: the prompt as given (chat messages are cut message by message).
        text / input_ids / offsets: the prompt as scored, ``input_ids`` ``[L]``.
        scores: ``[L]`` smoothed token scores; ``None`` when the prompt fit the only budget
            it was scored for, so the draft never ran.
        protected: ``[L]`` bool, tokens never cut (a tool prompt's template text), or ``None``.
        chunks: draft passes that scored the prompt (more than 1 past the draft's window or
            ``chunk_size``; ``lookahead`` is then empty, as no pass read the whole prompt).
    """

    prompt: Prompt = ""
    text: str = ""
    input_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    offsets: list[tuple[int, int]] = field(default_factory=list)
    scores: torch.Tensor | None = field(default_factory=lambda: torch.empty(0))
    protected: torch.Tensor | None = None
    chunks: int = 1


class SpecPCMethod(Method):
    info = SpecPCConfig.info
    config: SpecPCConfig

    def __init__(self, config: SpecPCConfig, models: Models) -> None:
        super().__init__(config, models)
        self.compressor = SpecPC(
            models.draft,
            models.draft_tokenizer,
            config,
            max_input_tokens=models.max_input_tokens,
            prefill_chunk_size=models.prefill_chunk_size,
        )

    def score(
        self,
        request: Request,
        budget: int | None = None,
        lookahead_tokens: int | None = None,
        *,
        target_extra: int = 0,
    ) -> ScoredTokens:
        """The draft's pass. ``lookahead_tokens`` overrides the config's ``n`` (SpecKV-PC
        scores with, and keeps, SpecKV's whole lookahead). ``target_extra``: tokens the target
        prefills after the kept prompt (SpecKV-PC's lookahead), for the check that it fits.
        The lookahead is written under the request's grammar, if it has one (see
        :func:`lookahead_guide`), so its attention reads the prompt as the constrained answer will."""
        models, stats = self.models, request.stats
        t0 = time.perf_counter()
        guide = lookahead_guide(models, request)
        tokenizer = models.tokenizer if models.shared_vocabulary else models.draft_tokenizer
        enc = encode_prompt(tokenizer, request.prompt, offsets=True, max_tokens=models.max_input_tokens)
        length = enc["input_ids"].numel()
        if budget is not None:  # before the draft's pass, not after
            check_capacity(budget, self.config.window_size)
            self.check_target_fits(min(length, budget), length, budget, target_extra)
        fits = budget is not None and length <= budget
        scores: torch.Tensor | None = None
        lookahead: list[int] = []
        chunks = 1
        if not fits:  # nothing would be cut at the only budget asked for: no draft pass
            raw, draft_lookahead = self.compressor.score_tokens(
                enc["input_ids"], lookahead_tokens=lookahead_tokens, guide=guide
            )
            chunks = len(self.compressor.scoring_slices(length, lookahead_tokens)) or 1
            scores = self.compressor.smooth(raw)
            lookahead = models.to_target_ids(draft_lookahead)
        stats.draft_s += time.perf_counter() - t0
        stats.prompt_tokens = enc["input_ids"].numel()
        return ScoredTokens(
            method=self.name,
            stats=replace(stats),
            lookahead=lookahead,
            prompt=request.prompt,
            text=enc["text"],
            input_ids=enc["input_ids"],
            offsets=list(enc["offsets"]),
            scores=scores,
            protected=tool_structure_tokens(request.prompt, enc),
            chunks=chunks,
        )

    def check_target_fits(self, kept: int, length: int, budget: int, extra: int = 0) -> None:
        """A clear error, before any forward, when the ``kept`` of ``length`` prompt tokens at
        ``budget`` (plus ``extra`` tokens after them) cannot fit the target's window."""
        limit = context_window(self.models.target)
        if limit is None or kept + extra <= limit:
            return
        fitting = limit - extra
        after = f" plus the {extra} lookahead tokens it prefills after them" if extra else ""
        raise ContextLengthError(
            f"SpecPC would hand the target {kept} of the prompt's {length} tokens (budget {budget})"
            f"{after}, but the target's context window is {limit}: set the SpecPC budget "
            f"(max_capacity_prompt) to {fitting} or less."
        )

    def cut(self, scored: ScoredTokens, budget: int, stats: GenerationStats) -> torch.Tensor:
        """``[kept]`` target ids of the prompt kept at ``budget``."""
        return self.cut_prompt(scored, budget, stats)[0]

    def cut_prompt(
        self, scored: ScoredTokens, budget: int, stats: GenerationStats
    ) -> tuple[torch.Tensor, Prompt, torch.Tensor | None]:
        """``[kept]`` target ids of the prompt kept at ``budget``, the kept prompt itself (text or
        chat messages) for a model that tokenises it anew, and ``[kept]`` bool: which of the kept
        ids are the tool structure (template text, earlier calls; ``None`` without tools)."""
        models = self.models
        t0 = time.perf_counter()
        if scored.scores is None:
            if budget < scored.input_ids.numel():
                raise InvalidInputError(
                    f"this SpecPC scoring skipped the draft (the prompt fit its budget); budget {budget} "
                    "would cut it: score the prompt without a budget (engine.score(prompt))."
                )
            if models.shared_vocabulary:
                return scored.input_ids, scored.prompt, scored.protected
            ids, protected = models.encode_target(scored.prompt)
            return ids, scored.prompt, protected
        compression = self.compressor.cut(
            scored.text, scored.input_ids, scored.offsets, scored.scores, budget, protected=scored.protected
        )
        kept_prompt: Any = compression.text
        if isinstance(scored.prompt, TrustedPrompt):
            kept_prompt = TrustedPrompt(kept_prompt)  # a trusted text stays trusted once cut
        elif is_messages(scored.prompt):
            kept_prompt = SpecPC._compressed_messages(
                scored.prompt,  # type: ignore[arg-type]
                scored.text,
                scored.offsets,
                compression.kept_positions,
            )
        protected = scored.protected
        if models.shared_vocabulary:
            ids = compression.input_ids
            protected = None if protected is None else protected[compression.kept_positions]
        else:  # the kept text (or chat), re-tokenised by the target
            ids, protected = models.encode_target(kept_prompt)
        stats.draft_s += time.perf_counter() - t0
        return ids, kept_prompt, protected

    def select(
        self,
        scored: ScoredPrompt,
        budget: int | None,
        stats: GenerationStats,
        *,
        greedy: bool = False,
        accept: AcceptLimit | None = None,
    ) -> Prefilled:
        if not isinstance(scored, ScoredTokens):
            raise InvalidInputError(f"SpecPC cannot answer from a {scored.method!r} scoring.")
        budget = self.config.budget if budget is None else budget
        ids = self.cut(scored, budget, stats)
        self.check_target_fits(ids.numel(), scored.input_ids.numel(), budget)
        full = Full(None, self.models)
        return full.select(full.score_ids(Request(scored.prompt, 0, stats), ids), None, stats)

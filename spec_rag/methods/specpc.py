"""SpecPC as an engine method: the draft scores the prompt's tokens, the target prefills only
the kept ones and keeps their whole cache. The compressor itself is :class:`spec_rag.SpecPC`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spec_rag._prompt import Prompt, TrustedPrompt, encode_prompt, is_messages
from spec_rag.config import SpecPCConfig
from spec_rag.errors import InvalidInputError
from spec_rag.generation import GenerationStats, Prefilled
from spec_rag.methods.base import AcceptLimit, Method, Models, Request, ScoredPrompt
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
    """

    prompt: Prompt = ""
    text: str = ""
    input_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    offsets: list[tuple[int, int]] = field(default_factory=list)
    scores: torch.Tensor | None = field(default_factory=lambda: torch.empty(0))
    protected: torch.Tensor | None = None


class SpecPCMethod(Method):
    info = SpecPCConfig.info
    config: SpecPCConfig

    def __init__(self, config: SpecPCConfig, models: Models) -> None:
        super().__init__(config, models)
        self.compressor = SpecPC(
            models.draft, models.draft_tokenizer, config, max_input_tokens=models.max_input_tokens
        )

    def score(
        self, request: Request, budget: int | None = None, lookahead_tokens: int | None = None
    ) -> ScoredTokens:
        """The draft's pass. ``lookahead_tokens`` overrides the config's ``n`` (SpecKV-PC
        scores with, and keeps, SpecKV's whole lookahead)."""
        models, stats = self.models, request.stats
        t0 = time.perf_counter()
        tokenizer = models.tokenizer if models.shared_vocabulary else models.draft_tokenizer
        enc = encode_prompt(tokenizer, request.prompt, offsets=True, max_tokens=models.max_input_tokens)
        if budget is not None:
            check_capacity(budget, self.config.window_size)  # before the draft's pass, not after
        fits = budget is not None and enc["input_ids"].numel() <= budget
        scores: torch.Tensor | None = None
        lookahead: list[int] = []
        if not fits:  # nothing would be cut at the only budget asked for: no draft pass
            raw, draft_lookahead = self.compressor.score_tokens(
                enc["input_ids"], lookahead_tokens=lookahead_tokens
            )
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
        )

    def cut(self, scored: ScoredTokens, budget: int, stats: GenerationStats) -> torch.Tensor:
        """``[kept]`` target ids of the prompt kept at ``budget``."""
        models = self.models
        t0 = time.perf_counter()
        if scored.scores is None:
            if budget < scored.input_ids.numel():
                raise InvalidInputError(
                    f"this SpecPC scoring skipped the draft (the prompt fit its budget); budget {budget} "
                    "would cut it: score the prompt without a budget (engine.score(prompt))."
                )
            return self.whole_prompt(scored)
        compression = self.compressor.cut(
            scored.text, scored.input_ids, scored.offsets, scored.scores, budget, protected=scored.protected
        )
        if models.shared_vocabulary:
            ids = compression.input_ids
        else:  # the kept text (or chat), re-tokenised by the target
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
            ids = encode_prompt(models.tokenizer, kept_prompt, max_tokens=models.max_input_tokens)[
                "input_ids"
            ]
        stats.draft_s += time.perf_counter() - t0
        return ids

    def whole_prompt(self, scored: ScoredTokens) -> torch.Tensor:
        """``[L]`` target ids of the prompt, nothing cut."""
        if self.models.shared_vocabulary:
            return scored.input_ids
        return encode_prompt(self.models.tokenizer, scored.prompt)["input_ids"]

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
        ids = self.cut(scored, self.config.budget if budget is None else budget, stats)
        full = Full(None, self.models)
        return full.select(full.score_ids(Request(scored.prompt, 0, stats), ids), None, stats)

"""SpecKV-PC: SpecPC then SpecKV, from one draft pass (Galim et al., 2026).

The draft reads the whole prompt once and writes SpecKV's lookahead; its attention (with the
lookahead's queries) cuts the prompt (SpecPC), and the lookahead, appended to the kept prompt,
guides the target's KV selection (SpecKV). Nothing here is new code: it chains the two methods.
A tool prompt's template structure survives SpecPC's cut, and SpecKV keeps its entries too.
"""

from __future__ import annotations

from dataclasses import replace

from spec_rag.config import SpecKVPCConfig
from spec_rag.generation import GenerationStats, Prefilled
from spec_rag.methods.base import (
    AcceptLimit,
    Method,
    Models,
    Request,
    ScoredCache,
    ScoredPrompt,
)
from spec_rag.methods.speckv import SpecKV
from spec_rag.methods.specpc import SpecPCMethod


class SpecKVPC(Method):
    info = SpecKVPCConfig.info
    config: SpecKVPCConfig

    def __init__(self, config: SpecKVPCConfig, models: Models) -> None:
        super().__init__(config, models)
        self.specpc = SpecPCMethod(config.specpc, models)
        self.speckv = SpecKV(config.speckv, models)

    def score(self, request: Request, budget: int | None = None) -> ScoredCache:
        """The prompt cut at the SpecPC budget, then the target's scoring prefill of what is kept;
        ``budget`` is the cache budget.

        A prompt that fits the SpecPC budget is not cut: the draft only writes the lookahead
        (SpecKV alone), and not even that when the prompt also fits the cache budget.

        The cache stage never evicts the tool structure of the prompt it prefills (the kept one).

        A prompt scored in chunks (past the draft's window) has no draft pass over all of it:
        its chunks score with SpecPC's own lookahead (``specpc.lookahead_tokens``), and the
        draft then writes SpecKV's lookahead once, from the kept prompt, which is what the
        target reads.

        Under constrained decoding the draft writes the lookahead under the answer's grammar
        (a draft with the target's vocabulary only; see :func:`lookahead_guide`), in whichever
        pass writes it."""
        pc_budget = self.specpc.config.max_capacity_prompt
        n = self.speckv.lookahead_length(request)
        tokens = self.specpc.score(request, pc_budget, lookahead_tokens=n, target_extra=n)
        ids, kept_prompt, protected = self.specpc.cut_prompt(tokens, pc_budget, request.stats)
        lookahead = tokens.lookahead if tokens.scores is not None else None  # None: SpecKV writes it
        request.stats.lookahead_tokens = len(tokens.lookahead)
        if tokens.chunks > 1:  # the draft writes the lookahead from the kept prompt
            request = replace(request, prompt=kept_prompt)
            lookahead = None
        request = replace(request, lookahead=lookahead)
        scored = self.speckv.score_ids(request, ids, budget, protected=protected)
        scored.method = self.name
        return scored

    def select(
        self,
        scored: ScoredPrompt,
        budget: int | None,
        stats: GenerationStats,
        *,
        greedy: bool = False,
        accept: AcceptLimit | None = None,
    ) -> Prefilled:
        return self.speckv.select(scored, budget, stats, greedy=greedy, accept=accept)

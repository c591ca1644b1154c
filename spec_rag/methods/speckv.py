"""SpecKV: SnapKV's selection, with the draft's approximate answer appended to the prompt so
its queries score the KV entries too (Galim et al., 2026; docs/algorithms.md).

The draft greedily writes ``n`` tokens (default: the request's ``max_new_tokens``); the target
prefills prompt + lookahead in one pass, recording the attention of its last ``window_size``
prompt queries and all ``n`` lookahead queries; the lookahead's own entries are then dropped.
"""

from __future__ import annotations

import time

import torch

from spec_rag._prompt import check_fits, encode_prompt
from spec_rag.config import SpecKVConfig
from spec_rag.methods.base import Models, Request, lookahead_guide
from spec_rag.methods.snapkv import SnapKV
from spec_rag.scoring import enable_scoring
from spec_rag.specpc import draft_pass


class SpecKV(SnapKV):
    info = SpecKVConfig.info
    config: SpecKVConfig  # type: ignore[assignment]

    def __init__(self, config: SpecKVConfig, models: Models) -> None:
        super().__init__(config, models)  # type: ignore[arg-type]
        enable_scoring(models.draft)  # harmless; keeps the draft's dispatch identical across methods

    def lookahead_length(self, request: Request) -> int:
        n = self.config.lookahead_tokens
        return request.max_new_tokens if n is None else n

    def write_lookahead(self, request: Request, ids: torch.Tensor) -> list[int]:
        """The lookahead the request brought, as it is, or else the draft's greedy answer."""
        if request.lookahead:
            return list(request.lookahead)
        return self.draft_lookahead(request, ids, self.lookahead_length(request))

    def draft_lookahead(self, request: Request, ids: torch.Tensor, n: int) -> list[int]:
        """The draft's greedy ``n``-token answer to the prompt ``ids`` (``[L]``), in target ids.

        Under constrained decoding (``request.guide``) a draft that shares the target's
        vocabulary writes it under the answer's grammar, so the target can accept it; a draft
        with another vocabulary writes it unconstrained (see :func:`lookahead_guide`)."""
        if n == 0:
            return []
        models = self.models
        t0 = time.perf_counter()
        draft_ids = (
            ids
            if models.shared_vocabulary
            else encode_prompt(models.draft_tokenizer, request.prompt, max_tokens=models.max_input_tokens)[
                "input_ids"
            ]
        )
        check_fits(models.draft, draft_ids.numel(), role="draft", lookahead=n)
        answer = draft_pass(
            models.draft,
            draft_ids,
            lookahead_tokens=n,
            eos_token_ids=models.draft_eos,
            guide=lookahead_guide(models, request),
            prefill_chunk_size=models.prefill_chunk_size,
        )
        request.stats.draft_s += time.perf_counter() - t0
        return models.to_target_ids(answer)

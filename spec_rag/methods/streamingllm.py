"""StreamingLLM (Xiao et al., 2024): keep the first ``sink_tokens`` positions (attention sinks)
and the most recent ones; no scores at all."""

from __future__ import annotations

import torch

from spec_rag.config import StreamingLLMConfig
from spec_rag.methods.base import CacheMethod, ScoredCache, ScoredPrompt
from spec_rag.selection import streaming_positions


class StreamingLLM(CacheMethod):
    info = StreamingLLMConfig.info
    config: StreamingLLMConfig

    def positions(self, scored: ScoredCache, budget: int) -> torch.Tensor:
        return streaming_positions(scored.length, budget, self.config.sink_tokens)  # [C], every head

    def accepts(self, scored: ScoredPrompt) -> bool:
        return isinstance(scored, ScoredCache)  # needs no scores, only the prompt's cache

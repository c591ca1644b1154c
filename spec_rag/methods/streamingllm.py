"""StreamingLLM (Xiao et al., 2024): keep the first ``sink_tokens`` positions (attention sinks)
and the most recent ones; no scores at all. A tool prompt's template structure is kept too.

With one budget to serve, each layer's cache is cut inside the prefill as soon as the layer has
written it (a :class:`~spec_rag.scoring.LayerHook`), so the whole prompt's cache never exists.
"""

from __future__ import annotations

from typing import Any

import torch

from spec_rag.config import StreamingLLMConfig
from spec_rag.generation import keep_layer_positions
from spec_rag.methods.base import CacheMethod, Models, ScoredCache, ScoredPrompt
from spec_rag.scoring import LayerHook, enable_scoring
from spec_rag.selection import forced_positions, streaming_positions


class StreamingLLM(CacheMethod):
    info = StreamingLLMConfig.info
    config: StreamingLLMConfig

    def __init__(self, config: StreamingLLMConfig, models: Models) -> None:
        super().__init__(config, models)
        enable_scoring(models.target)  # the hook that cuts each layer during the prefill

    def recorder(self, length: int) -> LayerHook:
        return LayerHook()

    def cuts_in_forward(self) -> bool:
        return True

    def cut_layer(
        self,
        cache: Any,
        length: int,
        budget: int,
        layer: int,
        scores: torch.Tensor | None,
        *,
        protected: torch.Tensor | None = None,
    ) -> None:
        keep_layer_positions(cache.layers[layer], self.positions_at(length, budget, protected))

    def positions_at(self, length: int, budget: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        """``[C]`` positions every head keeps: the sinks, the ``protected`` ones (``[L]`` bool), the
        most recent others."""
        return streaming_positions(length, budget, self.config.sink_tokens, protected)

    def positions(self, scored: ScoredCache, budget: int) -> torch.Tensor:
        return self.positions_at(scored.length, budget, scored.protected)

    def forced(self, length: int, protected: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        sinks = min(self.config.sink_tokens, length)
        forced = forced_positions(length, first=sinks, protected=protected)
        return forced, f"the first {sinks} positions (sink_tokens)"

    def accepts(self, scored: ScoredPrompt) -> bool:
        return isinstance(scored, ScoredCache)  # needs no scores, only the prompt's cache

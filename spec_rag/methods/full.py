"""Full inference: the target prefills the whole prompt and keeps every KV entry."""

from __future__ import annotations

from spec_rag.config import FULL
from spec_rag.methods.base import CacheMethod, ScoredCache, ScoredPrompt


class Full(CacheMethod):
    """No compression; answers from any method's whole-prompt prefill as well as its own."""

    info = FULL

    def accepts(self, scored: ScoredPrompt) -> bool:
        return isinstance(scored, ScoredCache)

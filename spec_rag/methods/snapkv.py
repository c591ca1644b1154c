"""SnapKV (Li et al., 2024): the target's own last ``window_size`` prompt queries score the KV
entries; each layer and KV head keeps its top ``C - w`` pooled positions plus the window."""

from __future__ import annotations

from spec_rag.config import SnapKVConfig
from spec_rag.methods.base import CacheMethod, Models
from spec_rag.scoring import HeadScoreRecorder, enable_scoring


class SnapKV(CacheMethod):
    info = SnapKVConfig.info
    config: SnapKVConfig

    def __init__(self, config: SnapKVConfig, models: Models) -> None:
        super().__init__(config, models)
        enable_scoring(models.target)

    def recorder(self, length: int) -> HeadScoreRecorder:
        window = self.window(length)
        return HeadScoreRecorder(length - window, length, reduction=self.config.reduction_type)

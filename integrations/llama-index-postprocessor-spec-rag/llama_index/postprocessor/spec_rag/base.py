"""SpecPC as a LlamaIndex node postprocessor.

A small draft model reads the retrieved nodes together with the query, once, and keeps the
tokens its attention says the answer needs. Unlike a prompt compressor that merges the nodes
into one text, every kept node keeps its id, metadata, relationships and retrieval score, and
gains its SpecPC score and token counts. The model work lives in ``spec_rag``; this module
only translates between LlamaIndex nodes and :meth:`spec_rag.SpecPC.compress_documents`.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle

from spec_rag import DocumentCompression, InvalidInputError, SpecPC, SpecPCConfig
from spec_rag.models import DEFAULT_DRAFT, get_model

SCORE_KEY = "spec_rag_score"
ORIGINAL_TOKENS_KEY = "spec_rag_original_tokens"
KEPT_TOKENS_KEY = "spec_rag_kept_tokens"
_ADDED_KEYS = (SCORE_KEY, ORIGINAL_TOKENS_KEY, KEPT_TOKENS_KEY)

# Fields that map one to one onto SpecPCConfig; None means "the config's default".
_CONFIG_FIELDS = tuple(SpecPCConfig.model_fields)


class SpecPCNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with SpecPC before they reach the LLM.

    Give the draft model one of three ways:

    - ``draft="smollm2-135m-instruct"``: a spec-rag model pack, a local directory or a hub id,
      loaded on first use and shared process-wide (default: the Qwen2.5-Coder-0.5B pack);
    - ``draft_model=..., draft_tokenizer=...``: a loaded Hugging Face model and fast tokenizer;
    - ``specpc=SpecPC(...)``: a ready compressor (config fields passed here override its config).

    ``max_capacity_prompt`` is the token budget of the whole compression prompt (instruction,
    document headers, every node and the question); nodes share what is left by relevance.
    The other config fields are :class:`spec_rag.SpecPCConfig`'s; ``None`` keeps its default.

    Each kept node is a copy of the input node with its text replaced by the kept text and
    ``spec_rag_score`` (1.0 for the most relevant node), ``spec_rag_original_tokens`` and
    ``spec_rag_kept_tokens`` added to its metadata (hidden from the LLM and the embedder).
    Nodes with nothing kept are dropped; the rest stay in retrieval order with their scores.

    Example:
        >>> postprocessor = SpecPCNodePostprocessor(draft="smollm2-135m-instruct", max_capacity_prompt=512)
        >>> query_engine = index.as_query_engine(node_postprocessors=[postprocessor])  # doctest: +SKIP
    """

    draft: str | None = Field(
        default=DEFAULT_DRAFT,
        description="Draft model: a spec-rag pack name, a local path or a hub id (loaded lazily).",
    )
    max_capacity_prompt: int = Field(
        default=1024, gt=0, description="Token budget of the whole compression prompt."
    )
    window_size: int | None = Field(default=None, ge=0, description="Scoring window (last prompt tokens).")
    kernel_size: int | None = Field(default=None, ge=1, description="Width of the score smoothing pool.")
    neighbor_tokens: int | None = Field(default=None, ge=1, description="Positions kept around each pick.")
    pool_type: Literal["max", "avg"] | None = Field(default=None, description="Score smoothing.")
    reduction_type: Literal["max", "mean"] | None = Field(
        default=None, description="How heads, queries and layers are combined."
    )
    lookahead_tokens: int | None = Field(default=None, ge=0, description="Draft tokens generated and scored.")
    starting_layer_index: int | None = Field(default=None, ge=0, description="First draft layer scored.")
    weighted_query: bool | None = Field(default=None, description="Weight newer window queries more.")
    keep_special_tokens: bool | None = Field(default=None, description="Never drop chat-template tokens.")
    instruction: str | None = Field(
        default=None, description="Instruction line of the compression prompt (default: spec-rag's)."
    )
    dtype: str = Field(default="bfloat16", description="dtype the draft is loaded in (by name).")
    device: str | None = Field(default=None, description="Device the draft is loaded on (default CPU).")

    _specpc: SpecPC | None = PrivateAttr(default=None)
    _draft_model: Any = PrivateAttr(default=None)
    _draft_tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        draft: str | None = None,
        *,
        draft_model: Any = None,
        draft_tokenizer: Any = None,
        specpc: SpecPC | None = None,
        **kwargs: Any,
    ) -> None:
        loaded = draft_model is not None or specpc is not None
        if draft is not None and loaded:
            raise ValueError(
                "pass the draft once: either draft=<name or path>, draft_model=..., or specpc=...."
            )
        if (draft_model is None) != (draft_tokenizer is None):
            raise ValueError("draft_model and draft_tokenizer go together: pass both (or draft=<name>).")
        if specpc is not None and draft_model is not None:
            raise ValueError("pass either specpc=... or draft_model=... (with draft_tokenizer), not both.")
        if draft is not None:
            kwargs["draft"] = draft
        elif loaded:
            kwargs["draft"] = None
        if specpc is not None:
            # The SpecPC's own config is the base; fields given here override it.
            for name in _CONFIG_FIELDS:
                kwargs.setdefault(name, getattr(specpc.config, name))
        super().__init__(**kwargs)
        config = self._config()  # invalid combinations fail now, not at the first query
        if specpc is not None:
            self._specpc = (
                specpc if config == specpc.config else SpecPC(specpc.model, specpc.tokenizer, config)
            )
        self._draft_model = draft_model
        self._draft_tokenizer = draft_tokenizer

    @classmethod
    def class_name(cls) -> str:
        return "SpecPCNodePostprocessor"

    def _config(self) -> SpecPCConfig:
        fields = {name: getattr(self, name) for name in _CONFIG_FIELDS if getattr(self, name) is not None}
        return SpecPCConfig(**fields)

    def _compressor(self) -> SpecPC:
        """The SpecPC instance, loading the draft on first use (once, even across threads)."""
        with self._lock:
            if self._specpc is None:
                model, tokenizer = self._draft_model, self._draft_tokenizer
                if model is None:
                    assert self.draft is not None
                    model, tokenizer = get_model(self.draft, dtype=self.dtype, device=self.device)
                self._specpc = SpecPC(model, tokenizer, self._config())
            return self._specpc

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if query_bundle is None or not query_bundle.query_str.strip():
            raise InvalidInputError(
                "SpecPCNodePostprocessor needs the query: SpecPC keeps what the nodes say about it. "
                "Call postprocess_nodes(nodes, query_str=...) or query_bundle=QueryBundle(...); "
                "query engines pass it for you."
            )
        if not nodes:
            return []
        texts = [item.node.get_content(metadata_mode=MetadataMode.NONE) for item in nodes]
        # The budget is passed per call so that changing the field later still takes effect.
        options: dict[str, Any] = {"max_capacity_prompt": self.max_capacity_prompt}
        if self.instruction is not None:
            options["instruction"] = self.instruction
        parts = self._compressor().compress_documents(query_bundle.query_str, texts, **options)
        return [
            NodeWithScore(node=_compressed_node(item.node, part), score=item.score)
            for item, part in zip(nodes, parts, strict=True)
            if part.kept_tokens > 0
        ]


def _compressed_node(node: BaseNode, part: DocumentCompression) -> BaseNode:
    """A deep copy of ``node`` (same id, metadata and relationships) holding the kept text."""
    copy = node.model_copy(deep=True)
    copy.set_content(part.text)
    copy.metadata[SCORE_KEY] = part.score
    copy.metadata[ORIGINAL_TOKENS_KEY] = part.original_tokens
    copy.metadata[KEPT_TOKENS_KEY] = part.kept_tokens
    for key in _ADDED_KEYS:
        if key not in copy.excluded_llm_metadata_keys:
            copy.excluded_llm_metadata_keys.append(key)
        if key not in copy.excluded_embed_metadata_keys:
            copy.excluded_embed_metadata_keys.append(key)
    return copy

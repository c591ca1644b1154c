"""SpecPC as a LlamaIndex node postprocessor.

A small draft model reads the retrieved nodes together with the query, once, and keeps the
tokens its attention says the answer needs. Unlike a prompt compressor that merges the nodes
into one text, every kept node keeps its id, metadata, relationships and retrieval score, and
gains its SpecPC score and token counts. The model work lives in ``spec_rag``; this module
only translates between LlamaIndex nodes and :meth:`spec_rag.SpecPC.compress_documents`.
"""

from __future__ import annotations

from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle

from spec_rag import DocumentCompression, SpecPC, SpecPCConfig
from spec_rag.adapters import (
    DEFAULT_MAX_INPUT_TOKENS,
    PREFILL_CHUNK_SIZE,
    Budget,
    DocumentCompressor,
    InputCeiling,
    PrefillChunk,
    draft_source,
    user_set,
)

SCORE_KEY = "spec_rag_score"
ORIGINAL_TOKENS_KEY = "spec_rag_original_tokens"
KEPT_TOKENS_KEY = "spec_rag_kept_tokens"
_ADDED_KEYS = (SCORE_KEY, ORIGINAL_TOKENS_KEY, KEPT_TOKENS_KEY)

# Fields that map one to one onto SpecPCConfig; None means "the config's default".
_CONFIG_FIELDS = tuple(SpecPCConfig.model_fields)


class SpecPCNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with SpecPC before they reach the LLM.

    Give the draft model one of three ways (none: the Qwen2.5-Coder-0.5B pack):

    - ``draft="smollm2-135m-instruct"``: a spec-rag model pack, a local directory or a hub id,
      loaded on first use and shared process-wide;
    - ``draft_model=..., draft_tokenizer=...``: a loaded Hugging Face model and fast tokenizer;
    - ``specpc=SpecPC(...)``: a ready compressor (config fields passed here override its config).

    ``max_capacity_prompt`` counts the nodes' tokens: all nodes together keep that many, shared
    by relevance; the instruction, node headers and question are kept on top of it. It counts
    in the draft's tokenizer unless ``target_tokenizer`` names the served model's (a model name
    or path that ``spec_rag.models.load_tokenizer`` loads offline, or a tokenizer object): then
    a budget of 1024 sends at most 1024 node tokens to the served model, and the token counts in
    the metadata are its tokens. The other
    config fields are :class:`spec_rag.SpecPCConfig`'s; ``None`` keeps the default, except
    ``kernel_size`` and ``neighbor_tokens``, which default to 16 to suit text-splitter chunks of
    about 200 tokens (for nodes of thousands of tokens the paper's 64 keeps passages together).

    Each kept node is a copy of the input node with its text replaced by the kept text and
    ``spec_rag_score`` (1.0 for the most relevant node), ``spec_rag_original_tokens`` and
    ``spec_rag_kept_tokens`` added to its metadata (hidden from the LLM and the embedder).
    Nodes with nothing kept are dropped (a warning is logged, once per postprocessor), and so
    are empty and whitespace-only nodes, which take no budget; the rest stay in retrieval
    order with their scores.

    Example:
        >>> postprocessor = SpecPCNodePostprocessor(draft="smollm2-135m-instruct", max_capacity_prompt=512)
        >>> query_engine = index.as_query_engine(node_postprocessors=[postprocessor])  # doctest: +SKIP
    """

    draft: str | None = Field(
        default=None,
        description="Draft model: a spec-rag pack name, a local path or a hub id (loaded lazily).",
    )
    max_capacity_prompt: Budget = Field(default=1024, description="Tokens of the nodes kept, all together.")
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
    chunk_size: int | None = Field(
        default=None,
        gt=0,
        description="Longest sequence one draft pass reads (None: the draft's window); longer "
        "prompts are scored in overlapping chunks that each end with the question.",
    )
    chunk_overlap: int | None = Field(default=None, ge=0, description="Tokens neighbouring chunks share.")
    instruction: str | None = Field(
        default=None, description="Instruction line of the compression prompt (default: spec-rag's)."
    )
    dtype: str = Field(
        default="auto",
        description="dtype the draft is loaded in (by name); auto: bfloat16 where the device "
        "computes it natively, else float32.",
    )
    device: str | None = Field(default=None, description="Device the draft is loaded on (default CPU).")
    max_input_tokens: InputCeiling = Field(
        default=DEFAULT_MAX_INPUT_TOKENS,
        description="Most prompt tokens one call may have (None: no ceiling; unset: the specpc's).",
    )
    prefill_chunk_size: PrefillChunk = Field(
        default=PREFILL_CHUNK_SIZE,
        description="The draft reads a longer prompt in chunks of this many tokens on one cache, "
        "which bounds its memory (None: one pass; unset: the specpc's). Not chunk_size.",
    )

    _core: DocumentCompressor = PrivateAttr()

    def __init__(
        self,
        draft: str | None = None,
        *,
        draft_model: Any = None,
        draft_tokenizer: Any = None,
        specpc: SpecPC | None = None,
        target_tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if specpc is not None:
            kwargs.setdefault("max_capacity_prompt", specpc.config.max_capacity_prompt)
        super().__init__(draft=draft, **kwargs)
        source = draft_source(
            "SpecPCNodePostprocessor",
            draft=draft,
            draft_model=draft_model,
            draft_tokenizer=draft_tokenizer,
            specpc=specpc,
            fields={name: getattr(self, name) for name in _CONFIG_FIELDS},
            dtype=self.dtype,
            device=self.device,
            max_input_tokens=user_set(self, "max_input_tokens"),
            target_tokenizer=target_tokenizer,
            prefill_chunk_size=user_set(self, "prefill_chunk_size"),
        )
        self.draft, self.max_input_tokens = source.draft, source.max_input_tokens
        self.prefill_chunk_size = source.prefill_chunk_size
        self._core = DocumentCompressor(source)

    @classmethod
    def class_name(cls) -> str:
        return "SpecPCNodePostprocessor"

    @property
    def spec_config(self) -> SpecPCConfig:
        """The SpecPC configuration this postprocessor runs with."""
        return self._core.source.config

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        texts = [item.node.get_content(metadata_mode=MetadataMode.NONE) for item in nodes]
        # The budget is read per call so that changing the field later still takes effect.
        parts = self._core.compress(
            query_bundle.query_str if query_bundle is not None else None,
            texts,
            budget=self.max_capacity_prompt,
            instruction=self.instruction,
        )
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

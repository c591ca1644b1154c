"""SpecPCCompressor: draft-guided compression of retrieved documents for LangChain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from spec_rag import SpecPC, SpecPCConfig
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

# SpecPCConfig fields a user may set one by one on the compressor (besides max_capacity_prompt).
_CONFIG_FIELDS = tuple(name for name in SpecPCConfig.model_fields if name != "max_capacity_prompt")


class SpecPCCompressor(BaseDocumentCompressor):
    """Compress retrieved documents with SpecPC: a small draft model reads the documents and the
    query once, and its attention decides which tokens of each document are worth keeping.

    Every output document is a new ``Document`` with the input's ``id`` and a copy of its
    metadata, plus ``metadata["spec_rag"]``: ``score`` (the importance of the document's best
    token, best document = 1.0), ``original_tokens``, ``kept_tokens`` and ``ratio``. All
    documents share one budget, so the useful ones keep more; documents of which nothing was
    kept are dropped (a warning is logged, once per compressor). Empty and whitespace-only
    documents take no budget and are dropped.

    Give the draft one of three ways (checked at construction, loaded on first use; none gives
    ``"qwen2.5-coder-0.5b-instruct"``):
        draft: a model name or path, loaded through ``spec_rag.get_model`` (shared cache).
        draft_model / draft_tokenizer: an already loaded Hugging Face causal LM and its fast
            tokenizer.
        specpc: a ready ``spec_rag.SpecPC`` (its config is the base; fields given here override it).

    Args:
        max_capacity_prompt: tokens of the documents kept, all documents together. The
            instruction, document headers and query are kept on top of it.
        window_size, kernel_size, neighbor_tokens, pool_type, reduction_type, lookahead_tokens,
            starting_layer_index, weighted_query, keep_special_tokens: ``SpecPCConfig`` fields;
            ``None`` keeps the default. ``kernel_size`` and ``neighbor_tokens`` default to 16,
            which suits text-splitter chunks of about 200 tokens; for documents of thousands of
            tokens the paper's 64 keeps whole passages together.
        chunk_size / chunk_overlap: documents longer than one draft pass (``None``: the draft's
            context window) are scored in overlapping chunks that each end with the query.
        config: a whole ``SpecPCConfig`` as the base of the fields above.
        dtype / device: how a draft given by name is loaded.
        order: ``"input"`` keeps the retriever's order, ``"score"`` sorts best first.
        instruction: the line the draft reads before the documents (default: SpecPC's).
        target_tokenizer: the served model's tokenizer, when the answer comes from a server
            (vLLM, an API): a model name or path (``spec_rag.models.load_tokenizer``, offline;
            loaded on first use) or a tokenizer object. ``max_capacity_prompt`` and the
            metadata's token counts are then in its tokens: a budget of 1024 sends at most 1024
            document tokens to the served model, whatever the draft's vocabulary.
        max_input_tokens: ceiling on the tokens of one call's prompt (``None``: none; unset: the
            ``specpc``'s, else spec-rag's default); a larger call raises ``InputTooLargeError``.
        prefill_chunk_size: the draft reads a prompt longer than this in chunks of this many
            tokens on one cache, which bounds its memory (``None``: one pass; unset: the
            ``specpc``'s, else 2048). Not ``chunk_size``, which splits into separate passes.

    Example:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever
            from langchain_spec_rag import SpecPCCompressor

            compressor = SpecPCCompressor(draft="qwen2.5-coder-0.5b-instruct", max_capacity_prompt=1024)
            retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
            docs = retriever.invoke("When was the vault opened?")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    draft: str | None = None
    draft_model: Any = Field(default=None, exclude=True, repr=False)
    draft_tokenizer: Any = Field(default=None, exclude=True, repr=False)
    specpc: SpecPC | None = Field(default=None, exclude=True, repr=False)
    target_tokenizer: Any = Field(default=None, exclude=True, repr=False)

    max_capacity_prompt: Budget = 1024
    window_size: int | None = None
    kernel_size: int | None = None
    neighbor_tokens: int | None = None
    pool_type: Literal["max", "avg"] | None = None
    reduction_type: Literal["max", "mean"] | None = None
    lookahead_tokens: int | None = None
    starting_layer_index: int | None = None
    weighted_query: bool | None = None
    keep_special_tokens: bool | None = None
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    config: SpecPCConfig | None = None

    dtype: str = "auto"
    device: str | None = None
    order: Literal["input", "score"] = "input"
    instruction: str | None = None
    max_input_tokens: InputCeiling = DEFAULT_MAX_INPUT_TOKENS
    prefill_chunk_size: PrefillChunk = PREFILL_CHUNK_SIZE

    _core: DocumentCompressor = PrivateAttr()

    @model_validator(mode="after")
    def _check_sources(self) -> SpecPCCompressor:
        fields = {name: getattr(self, name) for name in _CONFIG_FIELDS}
        no_base = self.config is None and self.specpc is None
        if no_base or "max_capacity_prompt" in self.model_fields_set:
            fields["max_capacity_prompt"] = self.max_capacity_prompt
        source = draft_source(
            "SpecPCCompressor",
            draft=self.draft,
            draft_model=self.draft_model,
            draft_tokenizer=self.draft_tokenizer,
            specpc=self.specpc,
            config=self.config,
            fields=fields,
            dtype=self.dtype,
            device=self.device,
            max_input_tokens=user_set(self, "max_input_tokens"),
            target_tokenizer=self.target_tokenizer,
            prefill_chunk_size=user_set(self, "prefill_chunk_size"),
        )
        self.draft, self.max_input_tokens = source.draft, source.max_input_tokens
        self.prefill_chunk_size = source.prefill_chunk_size
        self._core = DocumentCompressor(source)
        return self

    @property
    def spec_config(self) -> SpecPCConfig:
        """The SpecPC configuration this compressor runs with."""
        return self._core.source.config

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Keep the parts of ``documents`` the draft finds relevant to ``query``.

        Returns new documents (same ``id``, copied metadata plus ``metadata["spec_rag"]``), in
        input order or by score (see ``order``); documents with nothing kept are left out.

        Raises:
            ValueError: the query is empty (``spec_rag.InvalidInputError``).
        """
        parts = self._core.compress(
            query,
            [d.page_content for d in documents],
            budget=self.spec_config.max_capacity_prompt,
            instruction=self.instruction,
        )
        kept = [(doc, part) for doc, part in zip(documents, parts, strict=True) if part.kept_tokens > 0]
        if self.order == "score":
            kept.sort(key=lambda pair: pair[1].score, reverse=True)  # stable: ties keep input order
        return [
            doc.model_copy(
                update={
                    "page_content": part.text,
                    "metadata": {
                        **doc.metadata,
                        "spec_rag": {
                            "score": part.score,
                            "original_tokens": part.original_tokens,
                            "kept_tokens": part.kept_tokens,
                            "ratio": part.ratio,
                        },
                    },
                }
            )
            for doc, part in kept
        ]

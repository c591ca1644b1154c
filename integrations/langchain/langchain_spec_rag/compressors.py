"""SpecPCCompressor: draft-guided compression of retrieved documents for LangChain."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from spec_rag import InvalidInputError, SpecPC, SpecPCConfig

# SpecPCConfig fields a user may set one by one on the compressor (besides max_capacity_prompt).
_CONFIG_FIELDS = tuple(name for name in SpecPCConfig.model_fields if name != "max_capacity_prompt")


class SpecPCCompressor(BaseDocumentCompressor):
    """Compress retrieved documents with SpecPC: a small draft model reads the documents and the
    query once, and its attention decides which tokens of each document are worth keeping.

    Every output document is a new ``Document`` with the input's ``id`` and a copy of its
    metadata, plus ``metadata["spec_rag"]``: ``score`` (mean token importance, best document
    = 1.0), ``original_tokens``, ``kept_tokens`` and ``ratio``. Documents of which nothing was
    kept are dropped. All documents share one token budget, so the useful ones keep more.

    Give the draft one of three ways (checked at construction, loaded on first use):
        draft: a model name or path, loaded through ``spec_rag.get_model`` (shared cache), e.g.
            ``"qwen2.5-coder-0.5b-instruct"``.
        draft_model / draft_tokenizer: an already loaded Hugging Face causal LM and its fast
            tokenizer.
        specpc: a ready ``spec_rag.SpecPC`` (its own config is used).

    Args:
        max_capacity_prompt: token budget of the whole compression prompt (instruction, document
            headers and query included; they are always kept).
        window_size, kernel_size, neighbor_tokens, pool_type, reduction_type, lookahead_tokens,
            starting_layer_index, weighted_query, keep_special_tokens: ``SpecPCConfig`` fields;
            ``None`` keeps the paper's default.
        config: a whole ``SpecPCConfig`` instead of the fields above.
        dtype / device: how a draft given by name is loaded.
        order: ``"input"`` keeps the retriever's order, ``"score"`` sorts best first.
        instruction: the line the draft reads before the documents (default: SpecPC's).

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

    max_capacity_prompt: int = Field(default=1024, gt=0)
    window_size: int | None = None
    kernel_size: int | None = None
    neighbor_tokens: int | None = None
    pool_type: Literal["max", "avg"] | None = None
    reduction_type: Literal["max", "mean"] | None = None
    lookahead_tokens: int | None = None
    starting_layer_index: int | None = None
    weighted_query: bool | None = None
    keep_special_tokens: bool | None = None
    config: SpecPCConfig | None = None

    dtype: str = "bfloat16"
    device: str | None = None
    order: Literal["input", "score"] = "input"
    instruction: str | None = None

    _config: SpecPCConfig = PrivateAttr()
    _specpc: SpecPC | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _resolve_config(self) -> SpecPCCompressor:
        sources = [
            name
            for name, given in (
                ("draft", self.draft is not None),
                ("draft_model", self.draft_model is not None),
                ("specpc", self.specpc is not None),
            )
            if given
        ]
        if len(sources) != 1:
            found = f"got {' and '.join(sources)}" if sources else "got none"
            raise ValueError(
                f"SpecPCCompressor needs exactly one draft ({found}): pass draft='<name or path>' "
                "(e.g. 'qwen2.5-coder-0.5b-instruct'), or draft_model=... with draft_tokenizer=..., "
                "or specpc=SpecPC(...)."
            )
        if (self.draft_model is None) != (self.draft_tokenizer is None):
            raise ValueError("draft_model and draft_tokenizer go together: pass both, or draft='<name>'.")
        fields = {name: getattr(self, name) for name in _CONFIG_FIELDS if getattr(self, name) is not None}
        budget_set = "max_capacity_prompt" in self.model_fields_set
        if self.specpc is not None:
            if fields or self.config is not None:
                raise ValueError(
                    "specpc=... carries its own SpecPCConfig; do not also pass config fields "
                    f"({', '.join([*fields, *(['config'] if self.config else [])])}). "
                    "Build the SpecPC with the config you want instead."
                )
            config = self.specpc.config
            if budget_set:
                config = SpecPCConfig(
                    **{**config.model_dump(), "max_capacity_prompt": self.max_capacity_prompt}
                )
        elif self.config is not None:
            if fields:
                raise ValueError(
                    f"pass either config=SpecPCConfig(...) or single fields ({', '.join(fields)}), not both."
                )
            config = self.config
            if budget_set:
                config = SpecPCConfig(
                    **{**config.model_dump(), "max_capacity_prompt": self.max_capacity_prompt}
                )
        else:
            config = SpecPCConfig(max_capacity_prompt=self.max_capacity_prompt, **fields)
        self._config = config
        return self

    @property
    def spec_config(self) -> SpecPCConfig:
        """The SpecPC configuration this compressor runs with."""
        return self._config

    def _compressor(self) -> SpecPC:
        """The SpecPC instance, built (and the draft loaded) on first use; thread-safe."""
        if self._specpc is not None:
            return self._specpc
        with self._lock:
            if self._specpc is None:
                if self.specpc is not None:
                    self._specpc = self.specpc
                else:
                    model, tokenizer = self.draft_model, self.draft_tokenizer
                    if model is None:
                        from spec_rag.models import get_model  # imported on first use: it is heavy

                        assert self.draft is not None  # checked at construction
                        model, tokenizer = get_model(self.draft, dtype=self.dtype, device=self.device)
                    self._specpc = SpecPC(model, tokenizer, self._config)
            return self._specpc

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
            ValueError: the query is empty (``spec_rag.InvalidInputError``) or the budget
                cannot hold the instruction and query.
        """
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError(
                "SpecPCCompressor got an empty query: SpecPC scores documents by how they answer it. "
                "Pass the user's question."
            )
        if not documents:
            return []
        kwargs: dict[str, Any] = {"max_capacity_prompt": self._config.max_capacity_prompt}
        if self.instruction is not None:
            kwargs["instruction"] = self.instruction
        parts = self._compressor().compress_documents(query, [d.page_content for d in documents], **kwargs)
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

"""Specification of SpecPCCompressor (tiny random models: behaviour of the adapter, not quality)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import DocumentCompressorPipeline
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import BaseDocumentTransformer, Document
from langchain_core.retrievers import BaseRetriever
from langchain_spec_rag import SpecPCCompressor

from spec_rag import InputTooLargeError, InvalidInputError, ModelNotFoundError, SpecPC, SpecPCConfig

QUERY = "How does a class definition bind its name?"
SMALL = {"window_size": 8, "kernel_size": 5, "neighbor_tokens": 4}


def _documents() -> list[Document]:
    import pydoc_data.topics

    topics = ["class", "function", "if", "for", "while", "try"]
    return [
        Document(
            page_content=pydoc_data.topics.topics[t][:400], id=f"doc-{t}", metadata={"topic": t, "rank": i}
        )
        for i, t in enumerate(topics)
    ]


@pytest.fixture
def compressor(draft: Any, tokenizer: Any) -> SpecPCCompressor:
    return SpecPCCompressor(draft_model=draft, draft_tokenizer=tokenizer, max_capacity_prompt=220, **SMALL)


class _FixedRetriever(BaseRetriever):
    """Returns the same documents for every query."""

    documents: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return list(self.documents)


# -- construction -----------------------------------------------------------------------------


def test_a_missing_draft_path_fails_at_construction() -> None:
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        SpecPCCompressor(draft="./no/such/model")


def test_no_draft_is_the_default_draft() -> None:
    assert SpecPCCompressor().draft == "qwen2.5-coder-0.5b-instruct"


@pytest.mark.parametrize(
    "kwargs",
    [{"draft": "a", "draft_model": object(), "draft_tokenizer": object()}, {"draft_model": object()}],
    ids=["two-drafts", "model-without-tokenizer"],
)
def test_construction_needs_exactly_one_complete_draft(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="draft"):
        SpecPCCompressor(**kwargs)


def test_invalid_config_fails_at_construction_with_the_fix() -> None:
    with pytest.raises(ValueError, match="Raise max_capacity_prompt or lower window_size"):
        SpecPCCompressor(draft="smollm2-135m-instruct", max_capacity_prompt=16, window_size=32)


def test_config_fields_become_the_specpc_config() -> None:
    compressor = SpecPCCompressor(
        draft="smollm2-135m-instruct", max_capacity_prompt=300, kernel_size=9, starting_layer_index=2
    )
    assert compressor.spec_config == SpecPCConfig(
        max_capacity_prompt=300, kernel_size=9, neighbor_tokens=16, starting_layer_index=2
    )


def test_single_fields_override_a_whole_config() -> None:
    compressor = SpecPCCompressor(
        draft="smollm2-135m-instruct", config=SpecPCConfig(max_capacity_prompt=500), kernel_size=9
    )
    assert compressor.spec_config == SpecPCConfig(max_capacity_prompt=500, kernel_size=9)


def test_specpc_instance_brings_its_own_config(draft: Any, tokenizer: Any) -> None:
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(max_capacity_prompt=200, **SMALL))
    assert SpecPCCompressor(specpc=specpc).spec_config == specpc.config
    assert SpecPCCompressor(specpc=specpc, kernel_size=3).spec_config == specpc.config.model_copy(
        update={"kernel_size": 3}
    )


# -- compress_documents -----------------------------------------------------------------------


def test_each_output_keeps_the_input_id_and_metadata_and_gains_spec_rag_stats(
    compressor: SpecPCCompressor,
) -> None:
    documents = _documents()
    out = compressor.compress_documents(documents, QUERY)
    assert out, "something must be kept"
    by_id = {d.id: d for d in documents}
    for doc in out:
        source = by_id[doc.id]
        stats = doc.metadata.pop("spec_rag")
        assert doc.metadata == source.metadata
        assert set(stats) == {"score", "original_tokens", "kept_tokens", "ratio"}
        assert 0 < stats["kept_tokens"] <= stats["original_tokens"]
        assert stats["ratio"] == pytest.approx(stats["kept_tokens"] / stats["original_tokens"])
        assert 0.0 <= stats["score"] <= 1.0
        assert doc.page_content and len(doc.page_content) <= len(source.page_content)


def test_inputs_are_not_modified(compressor: SpecPCCompressor) -> None:
    documents = _documents()
    before = [d.model_copy(deep=True) for d in documents]
    out = compressor.compress_documents(documents, QUERY)
    assert documents == before
    assert all(o is not d for o in out for d in documents)


def test_outputs_are_what_specpc_kept_in_input_order(
    compressor: SpecPCCompressor, draft: Any, tokenizer: Any
) -> None:
    documents = _documents()
    specpc = SpecPC(draft, tokenizer, compressor.spec_config)
    budget = compressor.spec_config.max_capacity_prompt
    parts = specpc.compress_documents(QUERY, [d.page_content for d in documents], max_document_tokens=budget)
    expected = [(documents[p.index].id, p.text) for p in parts if p.kept_tokens > 0]
    assert [(d.id, d.page_content) for d in compressor.compress_documents(documents, QUERY)] == expected


def test_documents_with_nothing_kept_are_dropped(compressor: SpecPCCompressor) -> None:
    documents = [
        *_documents(),
        Document(page_content="", id="empty"),
        Document(page_content="   ", id="blank"),
    ]
    out = compressor.compress_documents(documents, QUERY)
    ids = [d.id for d in out]
    assert "empty" not in ids and "blank" not in ids
    assert sum(d.metadata["spec_rag"]["kept_tokens"] for d in out) == 220, (
        "the budget counts documents' tokens"
    )


def test_an_empty_document_leaves_the_others_unchanged(compressor: SpecPCCompressor) -> None:
    documents = _documents()[:3]
    alone = compressor.compress_documents(documents, QUERY)
    mixed = compressor.compress_documents([Document(page_content=""), *documents], QUERY)
    assert [(d.id, d.page_content) for d in mixed] == [(d.id, d.page_content) for d in alone]


def test_order_score_sorts_best_first(draft: Any, tokenizer: Any) -> None:
    by_score = SpecPCCompressor(
        draft_model=draft, draft_tokenizer=tokenizer, max_capacity_prompt=400, order="score", **SMALL
    )
    out = by_score.compress_documents(_documents(), QUERY)
    scores = [d.metadata["spec_rag"]["score"] for d in out]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(1.0)


@pytest.mark.parametrize("query", ["", "   \n"])
def test_empty_query_raises_a_value_error(compressor: SpecPCCompressor, query: str) -> None:
    with pytest.raises(ValueError, match="empty query") as error:
        compressor.compress_documents(_documents(), query)
    assert isinstance(error.value, InvalidInputError)


def test_no_documents_give_no_documents() -> None:
    # The default draft is a pack that may not even be installed: no documents never load it.
    assert SpecPCCompressor().compress_documents([], QUERY) == []


def test_dropping_whole_documents_is_logged_once(
    draft: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tight = SpecPCCompressor(draft_model=draft, draft_tokenizer=tokenizer, max_capacity_prompt=24, **SMALL)
    with caplog.at_level("WARNING", logger="spec_rag.adapters"):
        first = tight.compress_documents(_documents(), QUERY)
        tight.compress_documents(_documents(), QUERY)
    assert len(first) < len(_documents())
    assert [r.getMessage().split(" dropped")[0] for r in caplog.records] == ["SpecPCCompressor"]


def test_custom_instruction_changes_the_prompt_the_draft_reads(
    compressor: SpecPCCompressor, draft: Any, tokenizer: Any
) -> None:
    instructed = SpecPCCompressor(
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=240,
        instruction="Only facts.",
        **SMALL,
    )
    specpc = SpecPC(draft, tokenizer, instructed.spec_config)
    parts = specpc.compress_documents(
        QUERY, [d.page_content for d in _documents()], instruction="Only facts.", max_document_tokens=240
    )
    expected = [p.text for p in parts if p.kept_tokens > 0]
    assert [d.page_content for d in instructed.compress_documents(_documents(), QUERY)] == expected


def test_draft_named_by_string_is_loaded_once_across_threads(
    monkeypatch: pytest.MonkeyPatch, draft: Any, tokenizer: Any
) -> None:
    calls: list[str] = []

    def fake_get_model(name: str, **kwargs: Any) -> tuple[Any, Any]:
        calls.append(name)
        return draft, tokenizer

    monkeypatch.setattr("spec_rag.models.get_model", fake_get_model)
    compressor = SpecPCCompressor(draft="smollm2-135m-instruct", max_capacity_prompt=220, **SMALL)
    assert calls == [], "construction must not load"
    results: list[list[str]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                [d.page_content for d in compressor.compress_documents(_documents(), QUERY)]
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m-instruct"]
    assert len(results) == 3 and results[0] == results[1] == results[2]


@pytest.mark.asyncio
async def test_acompress_documents_matches_compress_documents(compressor: SpecPCCompressor) -> None:
    expected = compressor.compress_documents(_documents(), QUERY)
    assert await compressor.acompress_documents(_documents(), QUERY) == expected


# -- inside LangChain pipelines ---------------------------------------------------------------


def test_works_inside_contextual_compression_retriever(compressor: SpecPCCompressor) -> None:
    retriever = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=_FixedRetriever(documents=_documents())
    )
    out = retriever.invoke(QUERY)
    assert out == compressor.compress_documents(_documents(), QUERY)
    assert all("spec_rag" in d.metadata for d in out)


@pytest.mark.asyncio
async def test_works_inside_contextual_compression_retriever_async(compressor: SpecPCCompressor) -> None:
    retriever = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=_FixedRetriever(documents=_documents())
    )
    assert await retriever.ainvoke(QUERY) == compressor.compress_documents(_documents(), QUERY)


class _Tag(BaseDocumentTransformer):
    """A pipeline step after compression: stamps each document."""

    def transform_documents(self, documents: Any, **kwargs: Any) -> list[Document]:
        return [d.model_copy(update={"metadata": {**d.metadata, "tagged": True}}) for d in documents]


def test_works_inside_document_compressor_pipeline(compressor: SpecPCCompressor) -> None:
    pipeline = DocumentCompressorPipeline(transformers=[compressor, _Tag()])
    out = pipeline.compress_documents(_documents(), QUERY)
    expected = compressor.compress_documents(_documents(), QUERY)
    assert [d.id for d in out] == [d.id for d in expected]
    assert all(d.metadata["tagged"] and "spec_rag" in d.metadata for d in out)


def test_max_input_tokens_refuses_too_many_documents_and_the_next_call_works(
    compressor: SpecPCCompressor, draft: Any, tokenizer: Any
) -> None:
    bounded = SpecPCCompressor(
        draft_model=draft, draft_tokenizer=tokenizer, max_capacity_prompt=220, max_input_tokens=300, **SMALL
    )
    with pytest.raises(InputTooLargeError, match=r"more than max_input_tokens \(300\)"):
        bounded.compress_documents(_documents(), QUERY)
    one = _documents()[:1]
    assert bounded.compress_documents(one, QUERY) == compressor.compress_documents(one, QUERY)
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(**SMALL), max_input_tokens=300)
    assert SpecPCCompressor(specpc=specpc).max_input_tokens == 300  # unset: the specpc's own


def test_prefill_chunk_size_chunks_the_drafts_read_and_keeps_the_same_text(
    draft: Any, tokenizer: Any, layer_reads: Any
) -> None:
    calls = layer_reads(draft)
    options = {"draft_model": draft, "draft_tokenizer": tokenizer, "max_capacity_prompt": 220, **SMALL}
    whole = SpecPCCompressor(**options, prefill_chunk_size=None).compress_documents(_documents(), QUERY)
    assert max(calls) > 128
    calls.clear()
    chunked = SpecPCCompressor(**options, prefill_chunk_size=128).compress_documents(_documents(), QUERY)
    assert max(calls) <= 128
    assert [d.page_content for d in chunked] == [d.page_content for d in whole]
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(**SMALL), prefill_chunk_size=300)
    assert SpecPCCompressor(specpc=specpc).prefill_chunk_size == 300  # unset: the specpc's own
    assert SpecPCCompressor(specpc=specpc, prefill_chunk_size=None).prefill_chunk_size is None


# -- budgets in a served model's tokenizer ------------------------------------------------------


def test_target_tokenizer_by_path_budgets_in_the_served_models_tokens(
    draft: Any, tokenizer: Any, tmp_path: Any
) -> None:
    from spec_rag.specpc import count_tokens
    from spec_rag.testing import tiny_tokenizer

    served = tiny_tokenizer(2000)  # another vocabulary than the draft's
    served.save_pretrained(tmp_path / "served")
    budget = 150
    compressor = SpecPCCompressor(
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=budget,
        target_tokenizer=str(tmp_path / "served"),
        **SMALL,
    )
    out = compressor.compress_documents(_documents(), QUERY)
    counts = count_tokens(served, [d.page_content for d in out])
    assert budget - 4 <= sum(counts) <= budget
    assert [d.metadata["spec_rag"]["kept_tokens"] for d in out] == counts
    # The same budget in the draft's tokens sends the served model far fewer tokens.
    plain = SpecPCCompressor(
        draft_model=draft, draft_tokenizer=tokenizer, max_capacity_prompt=budget, **SMALL
    )
    assert sum(
        count_tokens(served, [d.page_content for d in plain.compress_documents(_documents(), QUERY)])
    ) < (0.8 * budget)


def test_a_missing_target_tokenizer_path_fails_at_construction() -> None:
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        SpecPCCompressor(draft="smollm2-135m-instruct", target_tokenizer="./no/such/tokenizer")
    with pytest.raises(ValueError, match="target_tokenizer must be a model name or path, or a tokenizer"):
        SpecPCCompressor(draft="smollm2-135m-instruct", target_tokenizer=42)

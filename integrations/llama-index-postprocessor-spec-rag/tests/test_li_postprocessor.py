"""SpecPCNodePostprocessor: nodes keep their identity, gain their figures, and errors are clear."""

from __future__ import annotations

import asyncio
import threading
import time

import llama_index.postprocessor.spec_rag as package
import pytest
from li_pp_support import corpus_text, tiny_model, tiny_tokenizer
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import (
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.postprocessor.spec_rag import SpecPCNodePostprocessor

from spec_rag import (
    DEFAULT_MAX_INPUT_TOKENS,
    DocumentCompression,
    InputTooLargeError,
    ModelNotFoundError,
    SpecPC,
    SpecPCConfig,
)

QUERY = "How does the with statement manage a context?"
ADDED_KEYS = ("spec_rag_score", "spec_rag_original_tokens", "spec_rag_kept_tokens")
SMALL = {"max_capacity_prompt": 160, "window_size": 16, "kernel_size": 8, "neighbor_tokens": 8}


class ScriptedSpecPC:
    """Stands in for SpecPC: answers with the given compressions and records what it was asked."""

    def __init__(self, results: list[DocumentCompression], config: SpecPCConfig | None = None) -> None:
        self.config = config or SpecPCConfig()
        self.max_input_tokens = DEFAULT_MAX_INPUT_TOKENS
        self.prefill_chunk_size = 2048
        self.results = results
        self.calls: list[tuple[str, list[str]]] = []
        self.options: list[dict] = []

    def compress_documents(self, query: str, documents: list[str], **options) -> list[DocumentCompression]:
        self.calls.append((query, list(documents)))
        self.options.append(options)
        return self.results


def _nodes(count: int = 3, length: int = 400) -> list[NodeWithScore]:
    text = corpus_text(count * length + 5000)[5000:]
    return [
        NodeWithScore(
            node=TextNode(
                id_=f"node-{i}",
                text=text[i * length : (i + 1) * length],
                metadata={"file_name": f"doc{i}.txt", "page": i},
                excluded_llm_metadata_keys=["page"],
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc-{i}")},
            ),
            score=1.0 - i / 10,
        )
        for i in range(count)
    ]


def _scripted(nodes: list[NodeWithScore], kept: list[int]) -> ScriptedSpecPC:
    return ScriptedSpecPC(
        [
            DocumentCompression(
                index=i, text=f"kept {i}" if k else "", score=1.0 / (i + 1), original_tokens=90, kept_tokens=k
            )
            for i, k in enumerate(kept)
        ]
    )


@pytest.fixture(scope="module")
def tiny_draft():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, seed=2), tokenizer


@pytest.fixture
def tiny_postprocessor(tiny_draft) -> SpecPCNodePostprocessor:
    model, tokenizer = tiny_draft
    return SpecPCNodePostprocessor(draft_model=model, draft_tokenizer=tokenizer, **SMALL)


# -- the translation, with a scripted compressor ---------------------------------------------
def test_kept_nodes_keep_id_metadata_relationships_and_retrieval_score():
    nodes = _nodes()
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 6, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    assert [n.node.node_id for n in out] == ["node-0", "node-1", "node-2"]
    assert [n.score for n in out] == [n.score for n in nodes]
    for before, after in zip(nodes, out, strict=True):
        assert type(after.node) is type(before.node)
        assert after.node.relationships == before.node.relationships
        assert {k: after.node.metadata[k] for k in before.node.metadata} == before.node.metadata


def test_node_text_is_replaced_by_the_kept_text():
    nodes = _nodes()
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 6, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    assert [n.node.get_content() for n in out] == ["kept 0", "kept 1", "kept 2"]


def test_compressor_sees_node_text_without_metadata_and_the_query():
    nodes = _nodes()
    scripted = _scripted(nodes, [5, 6, 7])
    SpecPCNodePostprocessor(specpc=scripted).postprocess_nodes(nodes, query_str=QUERY)
    assert scripted.calls == [(QUERY, [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes])]


def test_compression_figures_are_added_to_metadata():
    nodes = _nodes()
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 6, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    assert [n.node.metadata["spec_rag_score"] for n in out] == [1.0, 0.5, 1.0 / 3]
    assert [n.node.metadata["spec_rag_original_tokens"] for n in out] == [90, 90, 90]
    assert [n.node.metadata["spec_rag_kept_tokens"] for n in out] == [5, 6, 7]


def test_compression_figures_are_hidden_from_the_llm_and_the_embedder():
    nodes = _nodes()
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 6, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    for node in (n.node for n in out):
        assert set(ADDED_KEYS) <= set(node.excluded_llm_metadata_keys)
        assert set(ADDED_KEYS) <= set(node.excluded_embed_metadata_keys)
        assert "page" in node.excluded_llm_metadata_keys  # the node's own exclusions survive
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert "spec_rag" not in node.get_content(metadata_mode=mode)
        assert "file_name: doc" in node.get_content(metadata_mode=MetadataMode.LLM)


def test_nodes_with_nothing_kept_are_dropped_and_the_order_kept():
    nodes = _nodes()
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 0, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    assert [n.node.node_id for n in out] == ["node-0", "node-2"]


def test_input_nodes_are_not_mutated():
    nodes = _nodes()
    before = [n.model_dump() for n in nodes]
    out = SpecPCNodePostprocessor(specpc=_scripted(nodes, [5, 6, 7])).postprocess_nodes(
        nodes, query_str=QUERY
    )
    out[0].node.metadata["extra"] = 1
    out[0].node.relationships[NodeRelationship.SOURCE].metadata["extra"] = 1
    assert [n.model_dump() for n in nodes] == before


def test_the_budget_is_read_at_every_call():
    nodes = _nodes()
    scripted = ScriptedSpecPC(_scripted(nodes, [5, 6, 7]).results, SpecPCConfig(max_capacity_prompt=300))
    postprocessor = SpecPCNodePostprocessor(specpc=scripted)
    postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    postprocessor.max_capacity_prompt = 200
    postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    assert [options["max_document_tokens"] for options in scripted.options] == [300, 200]


# -- input checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("query_bundle", [None, QueryBundle(""), QueryBundle("   ")])
def test_a_missing_or_empty_query_is_a_clear_value_error(query_bundle):
    postprocessor = SpecPCNodePostprocessor(specpc=_scripted([], []))
    with pytest.raises(ValueError, match="needs the query"):
        postprocessor.postprocess_nodes(_nodes(), query_bundle=query_bundle)


def test_no_nodes_give_no_nodes_without_loading_the_draft(monkeypatch):
    monkeypatch.setattr("spec_rag.models.get_model", _no_loading)
    postprocessor = SpecPCNodePostprocessor(draft="smollm2-135m-instruct")
    assert postprocessor.postprocess_nodes([], query_str=QUERY) == []


def _no_loading(*args, **kwargs):
    raise AssertionError("the draft was loaded")


def test_an_unknown_draft_name_fails_at_construction_with_model_not_found():
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        SpecPCNodePostprocessor(draft="no-such-model")


def test_invalid_config_fails_at_construction():
    with pytest.raises(ValueError, match="window_size"):
        SpecPCNodePostprocessor(draft="smollm2-135m-instruct", max_capacity_prompt=32, window_size=64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"draft": "x", "specpc": ScriptedSpecPC([])},
        {"draft_model": object()},
        {"draft_model": object(), "draft_tokenizer": object(), "specpc": ScriptedSpecPC([])},
    ],
)
def test_ambiguous_or_incomplete_draft_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="draft"):
        SpecPCNodePostprocessor(**kwargs)


def test_fields_passed_with_a_specpc_override_its_config(tiny_draft):
    model, tokenizer = tiny_draft
    specpc = SpecPC(model, tokenizer, SpecPCConfig(**SMALL))
    assert SpecPCNodePostprocessor(specpc=specpc)._core.get() is specpc
    changed = SpecPCNodePostprocessor(specpc=specpc, max_capacity_prompt=200)
    assert changed.max_capacity_prompt == 200
    assert changed._core.get().config == SpecPCConfig(**{**SMALL, "max_capacity_prompt": 200})


def test_is_a_node_postprocessor_with_a_class_name_and_serialisable_config():
    postprocessor = SpecPCNodePostprocessor(draft="smollm2-135m-instruct", max_capacity_prompt=512)
    assert isinstance(postprocessor, BaseNodePostprocessor)
    assert SpecPCNodePostprocessor.class_name() == "SpecPCNodePostprocessor"
    data = postprocessor.to_dict()
    assert data["class_name"] == "SpecPCNodePostprocessor"
    assert SpecPCNodePostprocessor.from_dict(data).max_capacity_prompt == 512


def test_package_exports_only_the_postprocessor():
    assert package.__all__ == ["SpecPCNodePostprocessor"]


# -- with a tiny real draft ------------------------------------------------------------------
def test_tiny_draft_keeps_the_prompt_within_budget(tiny_postprocessor):
    nodes = _nodes(4)
    out = tiny_postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    assert out, "something must be kept"
    kept = sum(n.node.metadata["spec_rag_kept_tokens"] for n in out)
    original = sum(n.node.metadata["spec_rag_original_tokens"] for n in out)
    assert 0 < kept < original
    assert kept == SMALL["max_capacity_prompt"], "the budget counts the nodes' tokens"
    assert max(n.node.metadata["spec_rag_score"] for n in out) == pytest.approx(1.0)
    for node in out:  # kept text is made of pieces of the original text
        source = next(n for n in nodes if n.node.node_id == node.node.node_id).node.get_content()
        first_piece = node.node.get_content()[:12]
        assert first_piece in source


def test_tiny_draft_drops_an_empty_node(tiny_postprocessor):
    nodes = _nodes(2)
    nodes.insert(1, NodeWithScore(node=TextNode(id_="empty", text=""), score=0.5))
    out = tiny_postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    assert "empty" not in [n.node.node_id for n in out]


def test_tiny_draft_leaves_input_nodes_unmutated(tiny_postprocessor):
    nodes = _nodes()
    before = [n.model_dump() for n in nodes]
    tiny_postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.model_dump() for n in nodes] == before


def test_async_postprocessing_gives_the_sync_result(tiny_postprocessor):
    nodes = _nodes()
    sync = tiny_postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    result = asyncio.run(tiny_postprocessor.apostprocess_nodes(nodes, query_bundle=QueryBundle(QUERY)))
    assert [n.model_dump() for n in result] == [n.model_dump() for n in sync]


def test_draft_named_by_string_is_loaded_once_across_threads(monkeypatch, tiny_draft):
    calls: list[tuple[str, str]] = []

    def fake_get_model(name, *, dtype, device):
        calls.append((name, dtype))
        time.sleep(0.2)  # widen the window in which a second thread could start a second load
        return tiny_draft

    monkeypatch.setattr("spec_rag.models.get_model", fake_get_model)
    postprocessor = SpecPCNodePostprocessor(draft="qwen2.5-coder-0.5b-instruct", dtype="float32", **SMALL)
    assert calls == []  # nothing loads at construction
    results: list[list[str]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                [n.node.get_content() for n in postprocessor.postprocess_nodes(_nodes(), query_str=QUERY)]
            )
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [("qwen2.5-coder-0.5b-instruct", "float32")]
    assert len(results) == 4 and all(r == results[0] for r in results)


def test_an_empty_node_leaves_the_others_unchanged(tiny_postprocessor):
    nodes = _nodes(3)
    alone = tiny_postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    empty = NodeWithScore(node=TextNode(id_="empty", text=""), score=0.5)
    mixed = tiny_postprocessor.postprocess_nodes([empty, *nodes], query_str=QUERY)
    assert [(n.node.node_id, n.node.get_content()) for n in mixed] == [
        (n.node.node_id, n.node.get_content()) for n in alone
    ]


def test_max_input_tokens_refuses_too_many_nodes_and_the_next_call_works(tiny_draft, tiny_postprocessor):
    model, tokenizer = tiny_draft
    bounded = SpecPCNodePostprocessor(
        draft_model=model, draft_tokenizer=tokenizer, max_input_tokens=300, **SMALL
    )
    with pytest.raises(InputTooLargeError, match=r"more than max_input_tokens \(300\)"):
        bounded.postprocess_nodes(_nodes(4), query_str=QUERY)
    got = bounded.postprocess_nodes(_nodes(1), query_str=QUERY)
    want = tiny_postprocessor.postprocess_nodes(_nodes(1), query_str=QUERY)
    assert [n.node.get_content() for n in got] == [n.node.get_content() for n in want] != []
    specpc = SpecPC(model, tokenizer, SpecPCConfig(), max_input_tokens=300)
    assert SpecPCNodePostprocessor(specpc=specpc).max_input_tokens == 300  # unset: the specpc's own


def test_prefill_chunk_size_is_the_specpcs_unless_set_and_keeps_the_kept_text(tiny_draft):
    model, tokenizer = tiny_draft
    specpc = SpecPC(model, tokenizer, SpecPCConfig(**SMALL), prefill_chunk_size=300)
    assert SpecPCNodePostprocessor(specpc=specpc).prefill_chunk_size == 300  # unset: the specpc's own
    options = {"draft_model": model, "draft_tokenizer": tokenizer, **SMALL}
    whole = SpecPCNodePostprocessor(**options, prefill_chunk_size=None).postprocess_nodes(
        _nodes(3), query_str=QUERY
    )
    chunked = SpecPCNodePostprocessor(**options, prefill_chunk_size=96).postprocess_nodes(
        _nodes(3), query_str=QUERY
    )
    assert [n.node.get_content() for n in chunked] == [n.node.get_content() for n in whole] != []
    with pytest.raises(ValueError, match="greater than 0"):
        SpecPCNodePostprocessor(**options, prefill_chunk_size=0)


def test_target_tokenizer_object_budgets_in_the_served_models_tokens(tiny_draft):
    from spec_rag.specpc import count_tokens

    model, tokenizer = tiny_draft
    served = tiny_tokenizer(2000)  # another vocabulary than the draft's
    postprocessor = SpecPCNodePostprocessor(
        draft_model=model, draft_tokenizer=tokenizer, target_tokenizer=served, **SMALL
    )
    out = postprocessor.postprocess_nodes(_nodes(4), query_str=QUERY)
    counts = count_tokens(served, [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in out])
    budget = SMALL["max_capacity_prompt"]
    assert budget - 4 <= sum(counts) <= budget
    assert [n.node.metadata["spec_rag_kept_tokens"] for n in out] == counts

"""End to end with SmolLM2-135M: the query engine a LlamaIndex user writes, with our two parts.

Retrieval uses an offline hashing embedder, so the test needs no embedding model; the answer
comes from a real model and must carry the fact planted in one of the documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from li_llm_support import (
    AURORA_ANSWER,
    AURORA_QUESTION,
    TOWN_DOCUMENTS,
    HashEmbedding,
    skip_without_real_models,
)
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.llms.spec_rag import SpecKVLLM
from pydantic import Field

SpecPCNodePostprocessor = pytest.importorskip("llama_index.postprocessor.spec_rag").SpecPCNodePostprocessor

pytestmark = [pytest.mark.real_model, skip_without_real_models]

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    documents = [Document(text=text, id_=f"doc-{i}") for i, text in enumerate(TOWN_DOCUMENTS)]
    return VectorStoreIndex.from_documents(documents, embed_model=HashEmbedding())


@pytest.fixture(scope="module")
def llm() -> SpecKVLLM:
    # The prompt (QA template + 4 nodes, cut by SpecPC) is ~300 tokens: a 96-entry cache is a real cut.
    return SpecKVLLM(model=SMOL, draft=SMOL, max_capacity_prompt=96, max_new_tokens=24)


@pytest.fixture(scope="module")
def postprocessor() -> SpecPCNodePostprocessor:
    # Nodes here are ~60 tokens: a smoothing kernel and neighbourhood of 16 (not the paper's 64,
    # meant for long documents) keep one node's scores from spilling into the next.
    return SpecPCNodePostprocessor(draft=SMOL, max_capacity_prompt=192, kernel_size=16, neighbor_tokens=16)


class LLMStats(BaseEventHandler):
    """Collects the spec-rag statistics of every finished LLM chat (LlamaIndex instrumentation)."""

    seen: list[dict[str, Any]] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None:
            self.seen.append(event.response.raw["spec_rag"])


@pytest.fixture
def llm_stats() -> Iterator[LLMStats]:
    handler = LLMStats()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield handler
    dispatcher.event_handlers.remove(handler)


@pytest.fixture
def settings_llm() -> Iterator[None]:
    saved = Settings._llm
    yield
    Settings._llm = saved


def test_query_engine_with_specpc_and_speckv_answers_the_planted_fact(index, llm, postprocessor, llm_stats):
    engine = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=4)
    response = engine.query(AURORA_QUESTION)
    assert AURORA_ANSWER in str(response)
    [stats] = llm_stats.seen
    assert stats["method"] == "speckv-pc"  # the default method
    assert stats["kv_cache_tokens"] == 96 < stats["prompt_tokens"]
    sources = {node.node.ref_doc_id: node.node.metadata for node in response.source_nodes}
    assert "doc-0" in sources, "the node holding the fact must survive compression"
    kept = sum(m["spec_rag_kept_tokens"] for m in sources.values())
    original = sum(m["spec_rag_original_tokens"] for m in sources.values())
    assert kept < original


def test_streaming_query_engine_yields_the_answer_as_text(index, llm, postprocessor):
    engine = index.as_query_engine(
        llm=llm, node_postprocessors=[postprocessor], similarity_top_k=4, streaming=True
    )
    response = engine.query(AURORA_QUESTION)
    deltas = list(response.response_gen)
    assert len([d for d in deltas if d]) > 1
    assert AURORA_ANSWER in "".join(deltas)


def test_settings_llm_is_all_a_pipeline_needs(index, settings_llm):
    Settings.llm = SpecKVLLM(model=SMOL, draft=SMOL, max_capacity_prompt=96, max_new_tokens=24)
    response = index.as_query_engine(similarity_top_k=4).query(AURORA_QUESTION)
    assert AURORA_ANSWER in str(response)

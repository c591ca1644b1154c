"""Whatever a retriever returns, SpecPCNodePostprocessor gives kept nodes or a clear
``ValueError`` (spec-rag's ``InvalidInputError``), never crashes or mutates its input."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from li_pp_support import tiny_model, tiny_tokenizer
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.spec_rag import SpecPCNodePostprocessor

from spec_rag import InvalidInputError
from spec_rag.testing import NASTY_TEXTS

any_text = st.one_of(st.sampled_from(NASTY_TEXTS), st.text(max_size=200))
examples = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def postprocessor() -> SpecPCNodePostprocessor:
    tokenizer = tiny_tokenizer()
    return SpecPCNodePostprocessor(
        draft_model=tiny_model(tokenizer, seed=2),
        draft_tokenizer=tokenizer,
        max_capacity_prompt=128,
        window_size=8,
        kernel_size=5,
        neighbor_tokens=4,
    )


def _nodes(texts: list[str]) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(id_=f"n{i}", text=t), score=1.0 - i / 10) for i, t in enumerate(texts)
    ]


@examples
@given(query=any_text, texts=st.lists(any_text, max_size=6))
def test_postprocess_gives_kept_nodes_or_a_clear_error(
    postprocessor: SpecPCNodePostprocessor, query: str, texts: list[str]
) -> None:
    nodes = _nodes(texts)
    before = [n.model_dump() for n in nodes]
    try:
        out = postprocessor.postprocess_nodes(nodes, query_str=query)
    except ValueError as err:
        assert isinstance(err, InvalidInputError)
        assert re.search("query|leaves no room|context window", str(err))
        return
    finally:
        assert [n.model_dump() for n in nodes] == before, "input nodes must never be mutated"
    positions = [int(n.node.node_id[1:]) for n in out]
    assert positions == sorted(set(positions))
    for node in out:
        metadata = node.node.metadata
        assert 0 < metadata["spec_rag_kept_tokens"] <= metadata["spec_rag_original_tokens"]
        assert node.score == pytest.approx(1.0 - int(node.node.node_id[1:]) / 10)


def test_a_refused_call_leaves_the_postprocessor_answering_as_before(
    postprocessor: SpecPCNodePostprocessor,
) -> None:
    nodes = _nodes([NASTY_TEXTS[3] * 10, NASTY_TEXTS[2] * 10])
    first = [n.node.get_content() for n in postprocessor.postprocess_nodes(nodes, query_str="flags?")]
    with pytest.raises(ValueError):
        postprocessor.postprocess_nodes(nodes, query_str="")
    again = [n.node.get_content() for n in postprocessor.postprocess_nodes(nodes, query_str="flags?")]
    assert again == first

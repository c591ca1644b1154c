"""SpecPCNodePostprocessor with the real SmolLM2-135M draft: the fact the question needs survives."""

from __future__ import annotations

import pytest
from li_pp_support import AURORA_ANSWER, AURORA_QUESTION, TOWN_DOCUMENTS, skip_without_real_models
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.spec_rag import SpecPCNodePostprocessor

pytestmark = [pytest.mark.real_model, skip_without_real_models]


@pytest.fixture(scope="module")
def postprocessor() -> SpecPCNodePostprocessor:
    # ~60-token nodes: a kernel and neighbourhood of 16 (the paper's 64 suits long documents).
    return SpecPCNodePostprocessor(
        draft="smollm2-135m-instruct", max_capacity_prompt=160, kernel_size=16, neighbor_tokens=16
    )


@pytest.mark.parametrize("position", [0, 4, 7])
def test_the_node_with_the_answer_keeps_it_wherever_it_was_retrieved(postprocessor, position):
    nodes = [
        NodeWithScore(node=TextNode(id_=f"n{i}", text=t), score=0.5) for i, t in enumerate(TOWN_DOCUMENTS)
    ]
    nodes.insert(position, nodes.pop(0))
    out = postprocessor.postprocess_nodes(nodes, query_str=AURORA_QUESTION)
    kept = {n.node.node_id: n.node for n in out}
    assert AURORA_ANSWER in kept["n0"].get_content()
    assert kept["n0"].metadata["spec_rag_score"] == pytest.approx(1.0)
    assert len(out) < len(nodes)
    assert sum(n.metadata["spec_rag_kept_tokens"] for n in kept.values()) <= 160  # the nodes' budget

"""cookbooks/langgraph_agentic_rag.ipynb runs top to bottom on Qwen2.5-Coder-0.5B (target and
draft: the smallest pack whose chat template has tools), and its agent finds the planted fact."""

from __future__ import annotations

from pathlib import Path

import pytest

from spec_rag.testing import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[4] / "cookbooks" / "langgraph_agentic_rag.ipynb"
QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"

pytestmark = pytest.mark.needs_pack(QWEN_SMALL)  # `make install` installs it


@pytest.mark.enable_socket  # the notebook's kernel talks to this process over loopback
def test_agent_calls_the_retriever_tool_and_answers_with_the_planted_fact(tmp_path: Path) -> None:
    env = {"SPEC_RAG_COOKBOOK_TARGET": QWEN_SMALL, "SPEC_RAG_COOKBOOK_DRAFT": QWEN_SMALL}
    outputs = run_notebook(NOTEBOOK, tmp_path, env, timeout=1200)
    assert f"target: {QWEN_SMALL}" in outputs[0]
    run, summary = "\n".join(outputs[-3:-2]), outputs[-1]
    assert "--- retrieve" in run and "7319" in run, "the tool's result did not hold the planted note"
    assert "grade: yes" in run
    tool_line, answer_line = summary.splitlines()[:2]
    assert tool_line.startswith("tool calls: ['retrieve_notes'")
    assert answer_line.startswith("answer: ") and "7319" in answer_line
    assert "prompt tokens:" in outputs[-2]

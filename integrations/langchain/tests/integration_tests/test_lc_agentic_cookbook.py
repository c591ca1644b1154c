"""cookbooks/langgraph_agentic_rag.ipynb runs top to bottom on Qwen2.5-Coder-0.5B (target and
draft: the smallest pack whose chat template has tools), and its agent finds the planted fact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[4] / "cookbooks" / "langgraph_agentic_rag.ipynb"
QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"

pytestmark = pytest.mark.needs_pack(QWEN_SMALL)  # `make install` installs it


def _text_outputs(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stdout"
    )


@pytest.mark.enable_socket  # the notebook's kernel talks to this process over loopback
def test_agent_calls_the_retriever_tool_and_answers_with_the_planted_fact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "python3" kernel spec for this very interpreter, found first on JUPYTER_PATH.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SPEC_RAG_COOKBOOK_TARGET", QWEN_SMALL)
    monkeypatch.setenv("SPEC_RAG_COOKBOOK_DRAFT", QWEN_SMALL)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=1200, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [_text_outputs(c) for c in notebook.cells if c.cell_type == "code"]
    assert f"target: {QWEN_SMALL}" in outputs[0]
    run, summary = "\n".join(outputs[-3:-2]), outputs[-1]
    assert "--- retrieve" in run and "7319" in run, "the tool's result did not hold the planted note"
    assert "grade: yes" in run
    tool_line, answer_line = summary.splitlines()[:2]
    assert tool_line.startswith("tool calls: ['retrieve_notes'")
    assert answer_line.startswith("answer: ") and "7319" in answer_line
    assert "prompt tokens:" in outputs[-2]

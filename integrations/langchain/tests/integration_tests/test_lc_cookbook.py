"""cookbooks/langchain_rag.ipynb runs top to bottom (SmolLM2-135M as target and draft)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.real_model

NOTEBOOK = Path(__file__).resolve().parents[4] / "cookbooks" / "langchain_rag.ipynb"
SMOLLM2 = "smollm2-135m-instruct"


def _text_outputs(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stdout"
    )


@pytest.mark.enable_socket  # the notebook's kernel talks to this process over loopback
def test_cookbook_runs_and_shows_the_compression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A "python3" kernel spec for this very interpreter, found first on JUPYTER_PATH: a user-level
    # spec pointing at another Python cannot hijack the run.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SPEC_RAG_COOKBOOK_TARGET", SMOLLM2)
    monkeypatch.setenv("SPEC_RAG_COOKBOOK_DRAFT", SMOLLM2)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [_text_outputs(c) for c in notebook.cells if c.cell_type == "code"]
    assert f"target: {SMOLLM2}" in outputs[0]
    kept_report, table = outputs[-2], outputs[-1]
    assert "kept" in kept_report
    rows = {line[:16].strip(): line[16:].split() for line in table.splitlines()[1:]}
    full_prompt, full_kv = int(rows["full context"][0]), int(rows["full context"][1])
    spec_prompt, spec_kv = int(rows["SpecPC + SpecKV"][0]), int(rows["SpecPC + SpecKV"][1])
    assert spec_prompt < full_prompt, "SpecPC did not shorten the prompt"
    assert spec_kv == 512 < full_kv, "SpecKV did not cut the cache to its budget"

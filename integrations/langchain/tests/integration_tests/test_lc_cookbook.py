"""cookbooks/langchain_rag.ipynb runs top to bottom (SmolLM2-135M as target and draft)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spec_rag.testing import run_notebook

pytestmark = pytest.mark.real_model

NOTEBOOK = Path(__file__).resolve().parents[4] / "cookbooks" / "langchain_rag.ipynb"
SMOLLM2 = "smollm2-135m-instruct"


@pytest.mark.enable_socket  # the notebook's kernel talks to this process over loopback
def test_cookbook_runs_and_shows_the_compression(tmp_path: Path) -> None:
    env = {"SPEC_RAG_COOKBOOK_TARGET": SMOLLM2, "SPEC_RAG_COOKBOOK_DRAFT": SMOLLM2}
    outputs = run_notebook(NOTEBOOK, tmp_path, env)
    assert f"target: {SMOLLM2}" in outputs[0]
    kept_report, table = outputs[-2], outputs[-1]
    assert "kept" in kept_report
    rows = {line[:16].strip(): line[16:].split() for line in table.splitlines()[1:]}
    full_prompt, full_kv = int(rows["full context"][0]), int(rows["full context"][1])
    spec_prompt, spec_kv = int(rows["SpecPC + SpecKV"][0]), int(rows["SpecPC + SpecKV"][1])
    assert spec_prompt < full_prompt, "SpecPC did not shorten the prompt"
    assert spec_kv == 512 < full_kv, "SpecKV did not cut the cache to its budget"

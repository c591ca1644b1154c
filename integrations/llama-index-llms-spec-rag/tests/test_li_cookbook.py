"""The LlamaIndex cookbook runs top to bottom, with SmolLM2-135M standing in for the Qwen pair."""

from __future__ import annotations

from pathlib import Path

import pytest
from li_llm_support import skip_without_real_models

from spec_rag.testing import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[3] / "cookbooks" / "llamaindex_query_engine.ipynb"

pytestmark = [pytest.mark.real_model, skip_without_real_models]


@pytest.mark.enable_socket  # the notebook's kernel talks to this process over loopback
def test_llamaindex_cookbook_runs_and_prints_what_compression_saved(tmp_path):
    if not NOTEBOOK.exists():
        pytest.skip(f"{NOTEBOOK} is not here (package installed outside the spec-rag repository)")
    env = {
        "SPEC_RAG_COOKBOOK_TARGET": "smollm2-135m-instruct",
        "SPEC_RAG_COOKBOOK_DRAFT": "smollm2-135m-instruct",
        "SPEC_RAG_COOKBOOK_MAX_NEW_TOKENS": "48",
    }
    printed = "".join(run_notebook(NOTEBOOK, tmp_path, env))
    assert "target: smollm2-135m-instruct" in printed
    assert "LLM [full]" in printed and "LLM [speckv]" in printed
    assert " -> " in printed  # SpecPC's per-node token figures

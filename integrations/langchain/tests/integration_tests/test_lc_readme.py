"""The README's Python examples run as written: SmolLM2-135M stands in for the Qwen pair, except in
the tools example, which needs a chat template with tools and runs on Qwen2.5-Coder-0.5B (as both
target and draft)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SMOLLM2 = "smollm2-135m-instruct"
QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"


def _blocks(*, tools: bool) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    return [block for block in blocks if ("bind_tools(" in block) == tools]


def _run(blocks: list[str], model: str) -> str:
    out = io.StringIO()
    for block in blocks:
        code = block.replace("qwen2.5-coder-1.5b-instruct", model).replace(
            "qwen2.5-coder-0.5b-instruct", model
        )
        with contextlib.redirect_stdout(out):
            # dont_inherit: this file's `from __future__ import annotations` must not reach the README code
            exec(compile(code, str(README), "exec", dont_inherit=True), {"__name__": "readme"})
    return out.getvalue()


@pytest.mark.real_model
def test_readme_quick_start_runs_and_answers() -> None:
    printed = _run(_blocks(tools=False), SMOLLM2)
    assert "7319" in printed.splitlines()[0], printed
    assert "KV entries per head" in printed and "'kept_tokens'" in printed


@pytest.mark.needs_pack(QWEN_SMALL)
def test_readme_tools_example_calls_the_tool_grades_and_answers() -> None:
    blocks = _blocks(tools=True)
    assert len(blocks) == 1
    call, grade, answer = _run(blocks, QWEN_SMALL).splitlines()[:3]
    assert call.startswith("search_notes {'query': ")
    assert grade in ("binary_score='yes'", "binary_score='no'")  # the 0.5B stand-in grades "no" here
    assert "7319" in answer

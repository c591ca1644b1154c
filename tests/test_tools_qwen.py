"""Tool calling on the real Qwen pair (-m slow): a forced call, a free call for an obvious
question and its result fed back, and the README's example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spec_rag import SpecEngine, SpecKVConfig, get_model
from spec_rag._prompt import render_prompt

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "name": "search_documents",
    "description": "Search the company's internal documents.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def engine() -> SpecEngine:
    target, tokenizer = get_model("qwen2.5-coder-1.5b-instruct")
    draft, draft_tokenizer = get_model("qwen2.5-coder-0.5b-instruct")
    # The budget holds the template's tool structure (230 of the question's 239 tokens), never evicted.
    config = SpecKVConfig(max_capacity_prompt=256, window_size=16)
    return SpecEngine(target, tokenizer, draft, draft_tokenizer, config)


def test_a_required_call_names_the_tool_and_the_city(engine):
    answer = engine.generate(QUESTION, tools=[SEARCH, WEATHER], tool_choice="required", max_new_tokens=64)
    (call,) = answer.tool_calls
    assert call.name == "get_weather"
    assert "paris" in call.arguments["city"].lower()


def test_the_model_calls_the_obvious_tool_on_its_own_and_its_result_goes_back(engine):
    answer = engine.generate(QUESTION, tools=[SEARCH, WEATHER], max_new_tokens=64)
    assert [c.name for c in answer.tool_calls] == ["get_weather"], answer.text
    call = answer.tool_calls[0]
    follow_up = [
        *QUESTION,
        {"role": "assistant", "content": answer.text, "tool_calls": [call.to_message_dict()]},
        {"role": "tool", "content": "Sunny, 21 degrees Celsius.", "tool_call_id": call.id, "name": call.name},
    ]
    text, _ = render_prompt(engine.tokenizer, follow_up, tools=[SEARCH, WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in text
    assert "<tool_response>\nSunny, 21 degrees Celsius.\n</tool_response>" in text
    # (What the model does next is its own: in the run of 2026-12-02 Qwen2.5-Coder-1.5B wrote the
    # same call again instead of answering from the result.)


def test_readme_tools_example_runs(capsys):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    example = next(b for b in blocks if "tool_choice=" in b)
    exec(compile(example, str(readme), "exec"), {})
    out = capsys.readouterr().out
    assert "get_weather" in out and "Paris" in out
    assert '{"relevant": ' in out

"""Tiny random models with a real (offline-trained) BPE tokenizer, from :mod:`spec_rag.testing`:
every code path, no download."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from spec_rag.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def target(tokenizer: PreTrainedTokenizerFast) -> Any:
    return tiny_model(tokenizer, seed=1, layers=3)


@pytest.fixture(scope="session")
def draft(tokenizer: PreTrainedTokenizerFast) -> Any:
    return tiny_model(tokenizer, seed=2, layers=2)


# A Hermes-style chat template with tools (the format of the Qwen2.5 templates), for the tiny
# tokenizer: tools in the system turn, calls in <tool_call> blocks, results in <tool_response>.
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    'Call one as <tool_call>\n{"name": <name>, "arguments": <arguments>}\n</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for call in m['tool_calls'] %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tool_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer (a copy) with a chat template that renders tools."""
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = TOOLS_CHATML
    return tokenizer

"""The Qwen pair as a function-calling LlamaIndex LLM (slow: loads the 1.5B target and 0.5B draft).

An agent answers from a retriever-style tool whose result is the town's documents (about 700
tokens, compressed by SpecKV to a 384-entry budget, which holds the template's tool structure),
and structured_predict reads the planted fact into a typed object.

The calls are forced (``initial_tool_choice`` / ``tool_required``): left to choose, the 1.5B
Coder model was measured writing the call as a fenced JSON block instead of its template's
``<tool_call>`` tags, which is no call to LlamaIndex.
"""

from __future__ import annotations

import asyncio

import pytest
from li_llm_support import AURORA_ANSWER, AURORA_QUESTION, TOWN_DOCUMENTS
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.spec_rag import SpecKVLLM
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

CALLS: list[str] = []


def search_documents(query: str) -> str:
    """Search the town's documents (vaults, buildings, transport, events) for the query."""
    CALLS.append(query)
    return "\n\n".join(TOWN_DOCUMENTS)  # a retriever's top-k, the fact among distractors


class Vault(BaseModel):
    """A vault named in the text and its access code."""

    name: str = Field(max_length=40)
    code: int = Field(ge=0, le=9999)


@pytest.fixture(scope="module")
def llm() -> SpecKVLLM:
    return SpecKVLLM(
        model="qwen2.5-coder-1.5b-instruct",
        draft="qwen2.5-coder-0.5b-instruct",
        max_capacity_prompt=384,  # the tool structure and window alone take about 255 entries
        max_new_tokens=64,
    )


def test_the_qwen_pair_is_a_function_calling_model(llm):
    assert llm.metadata.is_function_calling_model is True


def test_a_function_agent_answers_from_the_retriever_tool(llm):
    from llama_index.core.agent.workflow import FunctionAgent

    CALLS.clear()
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=search_documents)],
        llm=llm,
        system_prompt="Answer questions about the town from its documents: search them first.",
        initial_tool_choice="search_documents",
    )

    async def run() -> str:
        return str(await agent.run(user_msg=AURORA_QUESTION))  # run() needs a running loop

    answer = asyncio.run(run())
    assert CALLS, "the agent answered without calling the tool"
    assert AURORA_ANSWER in answer, answer


def test_predict_and_call_calls_the_tool_with_a_query(llm):
    CALLS.clear()
    tool = FunctionTool.from_defaults(fn=search_documents)
    output = llm.predict_and_call([tool], AURORA_QUESTION, tool_required=True)
    assert len(CALLS) == 1 and CALLS[0].strip()
    assert AURORA_ANSWER in output.response  # the tool's output


def test_structured_predict_reads_the_fact_into_the_model(llm):
    prompt = PromptTemplate("{text}\n\nWhich vault has an access code, and what is the code?")
    vault = llm.structured_predict(Vault, prompt, text="\n\n".join(TOWN_DOCUMENTS))
    assert vault.code == int(AURORA_ANSWER)
    assert "aurora" in vault.name.lower()

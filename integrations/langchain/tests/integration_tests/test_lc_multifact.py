"""A question that needs two facts from different sentences of short documents, at the budgets of
the README's quick start: SpecPC must keep both (SmolLM2 draft), and the Qwen pair must answer
both through the compressor and ChatSpecKV (slow)."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_spec_rag import ChatSpecKV, SpecPCCompressor

QUESTION = "Who holds the access code for the Aurora vault, and what is the code?"
NAME, CODE = "Mira Okafor", "7319"
DOCUMENTS = [
    Document(
        "The Aurora vault lies beneath the observatory on Kestrel Hill. Its access code is held by one "
        f"person only, the night curator {NAME}. She changes it after every inspection. The current code "
        f"is {CODE}.",
        id="vault",
    ),
    Document(
        "The observatory cafe on Kestrel Hill serves cardamom buns and strong coffee. Its code of conduct "
        "asks visitors to keep their voices down after ten in the evening.",
        id="cafe",
    ),
    Document(
        "The harbour ferry leaves every hour from Pier 4. Its ticket office code for group bookings is 4420, "
        "and the crossing to the island takes forty minutes.",
        id="ferry",
    ),
    Document(
        "The museum of clocks keeps a water clock from the twelfth century. Its curator, Tomas Reyes, "
        "winds the great pendulum clock every Sunday.",
        id="museum",
    ),
]
README_COMPRESSOR_BUDGET = 1024  # the quick start's SpecPCCompressor(max_capacity_prompt=...)
README_KV_BUDGET = 256  # the quick start's ChatSpecKV(max_capacity_prompt=...)


@pytest.mark.real_model
@pytest.mark.parametrize(
    "budget",
    [
        README_COMPRESSOR_BUDGET,
        # Measured: at 64 document tokens the kept text ends on "The current code is" without the
        # code; recorded here so a fix to SpecPC's selection shows up as an unexpected pass.
        pytest.param(64, marks=pytest.mark.xfail(strict=True, reason="64 tokens cut the code off")),
    ],
)
def test_specpc_keeps_both_facts_of_a_multi_fact_question(budget: int) -> None:
    compressor = SpecPCCompressor(draft="smollm2-135m-instruct", max_capacity_prompt=budget, dtype="float32")
    kept = "\n".join(d.page_content for d in compressor.compress_documents(DOCUMENTS, QUESTION))
    assert NAME in kept and CODE in kept, kept


@pytest.mark.slow
def test_the_qwen_pair_answers_both_facts_at_the_readme_budgets() -> None:
    compressor = SpecPCCompressor(
        draft="qwen2.5-coder-0.5b-instruct", max_capacity_prompt=README_COMPRESSOR_BUDGET
    )
    llm = ChatSpecKV(
        model="qwen2.5-coder-1.5b-instruct",
        draft="qwen2.5-coder-0.5b-instruct",
        method="speckv",
        max_capacity_prompt=README_KV_BUDGET,
        max_tokens=32,
    )
    context = "\n\n".join(d.page_content for d in compressor.compress_documents(DOCUMENTS, QUESTION))
    answer = str(
        llm.invoke(
            [
                ("system", "Answer the question using only the context. Reply with the answer only."),
                ("human", f"Context:\n{context}\n\nQuestion: {QUESTION}"),
            ]
        ).content
    )
    assert NAME in answer and CODE in answer, answer

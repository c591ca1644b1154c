"""Behaviour on a real pretrained model (SmolLM2-135M-Instruct, from its offline pack)."""

from __future__ import annotations

import pytest
from tiny_models import corpus_text

from spec_rag import SpecEngine, SpecKVConfig, SpecPCConfig, StreamingLLMConfig, get_model

pytestmark = pytest.mark.real_model

NEEDLE = "\nThe special magic number for the Aurora project is 7319.\n"
QUESTION = "What is the special magic number for the Aurora project? Answer with the number only."
QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def smollm2():
    return get_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def needle_chat(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer(corpus_text(40_000))["input_ids"][:1400]
    haystack = tokenizer.decode(ids)
    middle = haystack.find("\n", len(haystack) // 2)
    document = haystack[:middle] + NEEDLE + haystack[middle:]
    return [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]


def _answer(smollm2, config, chat):
    model, tokenizer = smollm2
    engine = SpecEngine(model, tokenizer, draft=model, draft_tokenizer=tokenizer, config=config)
    return engine.generate(chat, max_new_tokens=16)


def test_full_context_finds_the_needle(smollm2, needle_chat):
    gen = _answer(smollm2, None, needle_chat)
    assert gen.stats.prompt_tokens > 1400
    assert "7319" in gen.text


def test_specpc_to_a_quarter_of_the_prompt_still_finds_the_needle(smollm2, needle_chat):
    length = _answer(smollm2, None, needle_chat).stats.prompt_tokens
    config = SpecPCConfig(max_capacity_prompt=length // 4, kernel_size=32, neighbor_tokens=32)
    gen = _answer(smollm2, config, needle_chat)
    assert gen.stats.target_prefill_tokens == length // 4
    assert "7319" in gen.text


def test_speckv_at_256_entries_still_finds_the_needle(smollm2, needle_chat):
    gen = _answer(smollm2, SpecKVConfig(max_capacity_prompt=256), needle_chat)
    assert gen.stats.kv_cache_tokens == 256
    assert "7319" in gen.text


def test_streamingllm_at_256_entries_loses_the_needle(smollm2, needle_chat):
    """The task is hard enough that keeping the wrong 256 entries fails: the other tests mean something."""
    gen = _answer(smollm2, StreamingLLMConfig(max_capacity_prompt=256), needle_chat)
    assert "7319" not in gen.text


@pytest.mark.needs_pack(QWEN_SMALL)
def test_documents_budgeted_in_a_served_qwen_tokenizer_with_a_smollm2_draft(smollm2):
    """SmolLM2 (49k vocabulary) scores, Qwen's tokenizer (151k), named as an adapter names it,
    counts: the budget is Qwen's. (The 0.5B pack, which CI installs, has the 1.5B's tokenizer.)"""
    from spec_rag.adapters import DocumentCompressor, draft_source
    from spec_rag.models import load_tokenizer
    from spec_rag.retrieval import python_reference_sections
    from spec_rag.specpc import count_tokens

    model, tokenizer = smollm2
    source = draft_source("test", draft_model=model, draft_tokenizer=tokenizer, target_tokenizer=QWEN_SMALL)
    texts = [s.text[:1500] for s in python_reference_sections()[:4]]
    parts = DocumentCompressor(source).compress("What does the assert statement do?", texts, budget=256)
    qwen = load_tokenizer(QWEN_SMALL)
    served = count_tokens(qwen, [p.text for p in parts])
    assert 250 <= sum(served) <= 256
    assert [p.kept_tokens for p in parts] == served
    assert [p.original_tokens for p in parts] == count_tokens(qwen, [t.strip() for t in texts])

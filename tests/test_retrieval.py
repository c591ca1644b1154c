"""The demo's offline corpus, BM25 retriever, RAG prompt and memory helpers."""

from __future__ import annotations

import mmap

from tiny_models import _tokenizer, tiny_model

from spec_rag.profiling import PeakMemory, kv_cache_bytes
from spec_rag.retrieval import BM25, python_reference_sections, rag_messages


def test_reference_sections_are_bounded_passages_with_titles():
    sections = python_reference_sections(max_chars=1800)
    assert len(sections) > 100
    assert all(s.text and s.title for s in sections)
    # paragraphs are never split, so only a single over-long paragraph can exceed the bound
    assert sum(len(s.text) > 1800 for s in sections) < len(sections) // 10


def test_bm25_ranks_the_passage_that_uses_the_query_words_first():
    texts = ["the cat sat on the mat", "nonlocal rebinds names in enclosing scopes", "dogs bark loudly"]
    assert BM25(texts).top("what does nonlocal rebind", 2)[0] == 1


def test_bm25_finds_the_nonlocal_section_of_the_reference():
    sections = python_reference_sections()
    retriever = BM25([f"{s.title}\n{s.text}" for s in sections])
    titles = [sections[i].title for i in retriever.top("What does the nonlocal statement do?", 4)]
    assert any(t.startswith("nonlocal") for t in titles)


def test_rag_messages_number_the_passages_and_end_with_the_question():
    messages = rag_messages("Why?", [("a", "first"), ("b", "second")])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "[1] a\nfirst" in messages[1]["content"] and "[2] b\nsecond" in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Why?")


def test_kv_cache_bytes_counts_keys_and_values_of_every_layer_and_head():
    model = tiny_model("qwen2", _tokenizer(512), layers=3)
    # 2 (k, v) x 3 layers x 2 kv heads x 16 head dim x 10 entries x 4 bytes
    assert kv_cache_bytes(model, 10) == 2 * 3 * 2 * 16 * 10 * 4


def test_peak_memory_sees_an_allocation_inside_the_block():
    # An anonymous mapping is fresh pages from the OS; a bytearray may reuse heap pages that an
    # earlier test freed and that are still resident, so RSS would not grow.
    with PeakMemory() as memory:
        block = mmap.mmap(-1, 64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    block.close()
    assert memory.peak >= 32 * 2**20

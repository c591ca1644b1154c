"""The demo's offline corpus, BM25 retriever, RAG prompt and memory helpers."""

from __future__ import annotations

import math
import mmap

import pytest
from tiny_models import _tokenizer, tiny_model

from spec_rag.profiling import PeakMemory, kv_cache_bytes
from spec_rag.retrieval import BM25, python_reference_sections, rag_messages, tokenize_words


def test_reference_sections_are_bounded_passages_with_titles():
    sections = python_reference_sections(max_chars=1800)
    assert len(sections) > 100
    assert all(s.text and s.title for s in sections)
    # paragraphs are never split, so only a single over-long paragraph can exceed the bound
    assert sum(len(s.text) > 1800 for s in sections) < len(sections) // 10


def test_bm25_ranks_the_passage_that_uses_the_query_words_first():
    texts = ["the cat sat on the mat", "nonlocal rebinds names in enclosing scopes", "dogs bark loudly"]
    assert BM25(texts).top("what does nonlocal rebind", 2)[0] == 1


def _okapi_scores(texts: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """BM25 written out term by term: Lucene idf, Okapi term weight, every query word counted."""
    docs = [tokenize_words(t) for t in texts]
    avg = sum(map(len, docs)) / len(docs)
    out = []
    for doc in docs:
        total = 0.0
        for word in tokenize_words(query):
            tf = doc.count(word)
            if tf:
                df = sum(word in d for d in docs)
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avg))
        out.append(total)
    return out


def test_bm25_scores_are_okapi_bm25_term_by_term():
    texts = [
        "the cat sat on the mat",
        "the cat chased the other cat around the garden of the house",
        "dogs bark",
        "",
        "Cat_names: Tom, Felix; CAT facts.",
    ]
    for query in ("cat", "the cat", "cat cat mat", "garden dogs", "cat_names felix", "unknown words"):
        got, want = BM25(texts).scores(query), _okapi_scores(texts, query)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), query
    assert BM25(texts, k1=0.9, b=0.4).scores("the cat") == pytest.approx(
        _okapi_scores(texts, "the cat", k1=0.9, b=0.4), rel=1e-12
    )


def test_bm25_ranks_the_reference_as_the_formula_does():
    sections = python_reference_sections()
    texts = [f"{s.title}\n{s.text}" for s in sections]
    retriever = BM25(texts)
    for query in ("What does the nonlocal statement do?", "yield from a generator", "with context manager"):
        want = _okapi_scores(texts, query)
        assert retriever.top(query, 10) == sorted(range(len(want)), key=lambda i: (-want[i], i))[:10]


def test_bm25_without_words_scores_zero():
    assert BM25([]).scores("anything") == [] and BM25([]).top("anything", 3) == []
    assert BM25(["", "  ,"]).scores("cat") == [0.0, 0.0]
    assert BM25(["a cat", "a dog"]).scores("zebra !") == [0.0, 0.0]
    assert BM25(["a cat", "a dog"]).top("", 2) == [0, 1]  # ties keep the given order


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

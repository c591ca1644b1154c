"""SpecPC: prompt and document compression."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tiny_models import _tokenizer

from spec_rag import InvalidInputError, SpecKVConfig, SpecKVPCConfig, SpecPC, SpecPCConfig, config_for_method
from spec_rag.specpc import count_tokens

CONFIG = SpecPCConfig(max_capacity_prompt=120, window_size=16, kernel_size=8, neighbor_tokens=8)


@pytest.fixture(scope="module")
def pc(draft, tokenizer):
    return SpecPC(draft, tokenizer, CONFIG)


def test_compress_keeps_the_budget_the_window_and_original_order(pc, tokenizer, long_text):
    out = pc.compress(long_text)
    ids = tokenizer(long_text)["input_ids"]
    assert out.original_tokens == len(ids)
    assert out.compressed_tokens == out.input_ids.numel() == 120
    assert out.kept_positions.tolist() == sorted(set(out.kept_positions.tolist()))
    assert set(range(len(ids) - 16, len(ids))) <= set(out.kept_positions.tolist())
    assert out.input_ids.tolist() == [ids[i] for i in out.kept_positions.tolist()]
    assert out.scores.shape == (len(ids),)
    assert out.ratio == pytest.approx(120 / len(ids))


def test_compressed_text_is_made_of_exact_runs_of_the_original(pc, long_text):
    out = pc.compress(long_text)
    for piece in out.text.split():
        assert piece in long_text


def test_compressing_chat_messages_returns_compressed_messages(pc, long_text):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text}]
    out = pc.compress(messages)
    assert [m["role"] for m in out.messages] == ["system", "user"]
    assert len(out.messages[1]["content"]) < len(long_text)
    # chat-template special tokens are never dropped
    assert out.text.count("<|im_start|>") == 3


def test_a_prompt_within_budget_is_kept_whole(pc):
    out = pc.compress("A short prompt about lambdas.")
    assert out.compressed_tokens == out.original_tokens


def test_documents_map_back_to_their_inputs_in_order(pc, long_text):
    docs = [long_text[:1200], "Lambda expressions create anonymous functions.", long_text[1200:2400]]
    parts = pc.compress_documents("What do lambda expressions create?", docs, max_capacity_prompt=200)
    assert [p.index for p in parts] == [0, 1, 2]
    assert all(0 <= p.kept_tokens <= p.original_tokens for p in parts)
    assert max(p.score for p in parts) == pytest.approx(1.0)
    for part, doc in zip(parts, docs, strict=True):
        for piece in part.text.split():
            assert piece in doc


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=6),
    budget=st.integers(60, 400),
)
def test_documents_share_one_budget_and_the_question_is_never_cut(pc, tokenizer, docs, budget):
    query = "Which statement inserts debugging assertions?"
    try:
        parts = pc.compress_documents(query, docs, max_capacity_prompt=budget)
    except InvalidInputError as err:  # budget below the protected instruction + question
        assert "leaves no room" in str(err)
        return
    assert len(parts) == len(docs)
    present = [d for d in docs if d.strip()]  # empty documents stay out of the prompt
    if not present:
        assert all(p.original_tokens == p.kept_tokens == 0 for p in parts)
        return
    text, _, _ = pc._document_prompt(query, present, "Answer the question using the documents below.")
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    in_docs = sum(p.original_tokens for p in parts)
    kept = sum(p.kept_tokens for p in parts)
    protected = total - in_docs
    assert kept + protected == min(budget, total)  # protected tokens all kept; documents fill the rest


def test_empty_query_is_refused(pc):
    with pytest.raises(InvalidInputError, match="query is empty"):
        pc.compress_documents("  ", ["some text"])


def test_no_documents_gives_no_parts(pc):
    assert pc.compress_documents("why?", []) == []


def test_budget_below_the_question_is_a_clear_error(pc, long_text):
    with pytest.raises(InvalidInputError, match="leaves no room"):
        pc.compress_documents("What is this about?", [long_text], max_capacity_prompt=5)


def test_budget_below_the_window_is_a_clear_error(pc, long_text):
    with pytest.raises(InvalidInputError, match="smaller than window_size"):
        pc.compress(long_text, max_capacity_prompt=4)


def test_scores_favour_tokens_the_draft_attends_to(draft, tokenizer, long_text):
    pc = SpecPC(
        draft,
        tokenizer,
        SpecPCConfig(max_capacity_prompt=100, window_size=8, kernel_size=1, neighbor_tokens=1),
    )
    ids = torch.tensor(tokenizer(long_text)["input_ids"])
    raw, lookahead = pc.score_tokens(ids)
    assert raw.shape == ids.shape and len(lookahead) <= 1
    out = pc.compress(long_text)
    outside = [i for i in range(ids.numel() - 8) if i not in set(out.kept_positions.tolist())]
    kept = [i for i in out.kept_positions.tolist() if i < ids.numel() - 8]
    assert min(out.scores[kept]) >= max(out.scores[outside])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SpecPCConfig(max_capacity_prompt=32, window_size=64), "window_size"),
        (lambda: SpecKVConfig(kernel_size=8), "kernel_size must be odd"),
        (lambda: SpecKVConfig(pool_type="median"), "pool_type"),
        (lambda: SpecKVConfig(max_capacity_prompt=0), "max_capacity_prompt"),
        (
            lambda: SpecKVPCConfig(
                specpc=SpecPCConfig(max_capacity_prompt=256), speckv=SpecKVConfig(max_capacity_prompt=512)
            ),
            "cannot hold more",
        ),
        (lambda: config_for_method("lingua"), "unknown method"),
    ],
)
def test_invalid_configs_say_what_to_change(make, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        make()


def test_paper_defaults():
    pc, kv = SpecPCConfig(), SpecKVConfig()
    assert (
        pc.window_size,
        pc.kernel_size,
        pc.neighbor_tokens,
        pc.lookahead_tokens,
        pc.starting_layer_index,
    ) == (64, 64, 64, 1, 8)
    assert (kv.window_size, kv.kernel_size, kv.pool_type, kv.reduction_type, kv.lookahead_tokens) == (
        32,
        7,
        "max",
        "max",
        None,
    )
    assert config_for_method("full") is None
    assert (
        config_for_method(
            "speckv-pc", max_capacity_prompt=512, prompt_capacity=1024
        ).specpc.max_capacity_prompt
        == 1024
    )


def test_a_document_does_not_lend_its_scores_to_its_neighbour(draft, tokenizer):
    wide = SpecPC(draft, tokenizer, SpecPCConfig(max_capacity_prompt=400, window_size=8, kernel_size=64))
    docs = ["alpha beta gamma " * 10, "delta epsilon zeta " * 10, "eta theta iota " * 10]
    query = "Which letters?"
    text, spans, _ = wide._document_prompt(query, docs, "Answer the question using the documents below.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    raw, _ = wide.score_tokens(torch.tensor(enc["input_ids"]))
    peaks = []
    for start, end in spans:
        inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s >= start and e <= end and e > s]
        peaks.append(float(raw[inside].max()))
    parts = wide.compress_documents(query, docs, max_capacity_prompt=400)
    # A max pool inside each document keeps the document's own peak; leaking would raise it.
    assert [p.score for p in parts] == pytest.approx([p / max(peaks) for p in peaks], rel=1e-5)


def test_a_longer_lookahead_scores_as_the_configured_one_and_extends_it(draft, tokenizer, long_text):
    pc = SpecPC(draft, tokenizer, SpecPCConfig(max_capacity_prompt=128, window_size=8, lookahead_tokens=3))
    ids = tokenizer(long_text[:1500], return_tensors="pt")["input_ids"][0]
    alone, short = pc.score_tokens(ids)
    shared, long = pc.score_tokens(ids, generate_tokens=10)
    assert torch.allclose(alone, shared)
    assert long[: len(short)] == short and len(long) > len(short)
    wider, _ = pc.score_tokens(ids, lookahead_tokens=10)
    assert not torch.allclose(alone, wider)  # the extra queries do change scores when counted


# -- budgets in the served model's tokenizer ----------------------------------------------------
@pytest.fixture(scope="module")
def served_tokenizer():
    """A tokenizer with another vocabulary than the draft's (2000 vs 512 tokens): it cuts the
    same text into far fewer tokens, as a served model's larger vocabulary does."""
    return _tokenizer(2000)


def _documents(long_text: str) -> list[str]:
    return [long_text[i : i + 1000] for i in range(0, 6000, 1000)]


@pytest.mark.parametrize("budget", [40, 200, 600])
def test_target_tokenizer_budgets_the_documents_in_the_served_models_tokens(
    pc, tokenizer, served_tokenizer, long_text, budget
):
    docs = _documents(long_text)
    query = "What do lambda expressions create?"
    parts = pc.compress_documents(query, docs, max_document_tokens=budget, target_tokenizer=served_tokenizer)
    served = count_tokens(served_tokenizer, [p.text for p in parts])
    # The kept texts, re-tokenised by the served model's tokenizer, fit the budget and nearly fill it.
    assert sum(served) <= budget
    assert sum(served) >= budget - max(4, budget // 50), served
    assert [p.kept_tokens for p in parts] == served
    assert [p.original_tokens for p in parts] == count_tokens(served_tokenizer, [d.strip() for d in docs])
    for part, doc in zip(parts, docs, strict=True):
        for piece in part.text.split():
            assert piece in doc
    # Counted in the draft's tokens instead, the same budget sends the served model far fewer.
    drafted = pc.compress_documents(query, docs, max_document_tokens=budget)
    assert sum(count_tokens(served_tokenizer, [p.text for p in drafted])) < 0.8 * budget
    assert sum(p.kept_tokens for p in drafted) == budget


def test_target_tokenizer_keeps_documents_that_fit_whole(pc, served_tokenizer, long_text):
    docs = ["", *_documents(long_text)[:2]]
    whole = sum(count_tokens(served_tokenizer, docs))
    parts = pc.compress_documents(
        "What is this about?", docs, max_document_tokens=whole, target_tokenizer=served_tokenizer
    )
    assert [p.text for p in parts] == [d.strip() for d in docs]
    counts = count_tokens(served_tokenizer, [d.strip() for d in docs])
    assert [p.kept_tokens for p in parts] == [p.original_tokens for p in parts] == counts


def test_target_tokenizer_needs_a_document_budget(pc, served_tokenizer, long_text):
    with pytest.raises(InvalidInputError, match="pass max_document_tokens"):
        pc.compress_documents("Why?", _documents(long_text), target_tokenizer=served_tokenizer)

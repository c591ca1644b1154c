"""SpecPC past the draft's window: chunked scoring, one global selection, the target-fit check.

The draft here has a 256-token window, so the ~2.6k-token test prompt is scored in chunks."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import tiny_model

from spec_rag import (
    ContextLengthError,
    InvalidInputError,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPC,
    SpecPCConfig,
)
from spec_rag.config import CHUNK_SINK_TOKENS

WINDOW = 16
CONFIG = SpecPCConfig(
    max_capacity_prompt=120, window_size=WINDOW, kernel_size=8, neighbor_tokens=8, chunk_overlap=32
)


@pytest.fixture(scope="module")
def short_draft(tokenizer):
    """The session draft's weights with a 256-token context window."""
    return tiny_model("qwen2", tokenizer, seed=2, layers=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def ids(tokenizer, long_text_module) -> torch.Tensor:
    return torch.tensor(tokenizer(long_text_module)["input_ids"])


@pytest.fixture(scope="module")
def long_text_module() -> str:
    from tiny_models import corpus_text

    return corpus_text(6000)


class PrefillLog:
    """Records the token ids of every prefill (more than one token) a model runs."""

    def __init__(self, model) -> None:
        self.prefills: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1:
            self.prefills.append(input_ids[0].clone())

    def __enter__(self) -> PrefillLog:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_a_prompt_that_fits_one_pass_is_scored_exactly_as_before(draft, tokenizer, long_text_module):
    """A chunk_size the prompt fits changes nothing: same scores, same kept tokens, one pass."""
    length = len(tokenizer(long_text_module)["input_ids"])
    # One forward per pass (no prefill chunks), so the log counts passes.
    today = SpecPC(draft, tokenizer, CONFIG, prefill_chunk_size=None).compress(long_text_module)
    roomy = SpecPC(
        draft, tokenizer, CONFIG.model_copy(update={"chunk_size": length + 1}), prefill_chunk_size=None
    )
    assert roomy.chunk_slices(length) == []
    with PrefillLog(draft) as log:
        out = roomy.compress(long_text_module)
    assert len(log.prefills) == 1 and out.chunks == 1
    assert torch.equal(out.scores, today.scores)
    assert torch.equal(out.kept_positions, today.kept_positions)
    assert out.lookahead_ids == today.lookahead_ids


def test_one_chunk_holding_the_whole_prompt_scores_as_the_whole_pass(draft, tokenizer, ids):
    """The chunk scorer is the whole-prompt scorer when its single chunk is the whole prompt."""
    pc = SpecPC(draft, tokenizer, CONFIG)
    raw, _ = pc.score_tokens(ids)
    whole = [(CHUNK_SINK_TOKENS, ids.numel() - WINDOW)]
    merged = pc.score_chunks(ids, whole, CONFIG.lookahead_tokens)
    torch.testing.assert_close(merged, raw)


def test_a_long_prompt_is_scored_in_chunks_that_cover_it_and_each_end_with_the_query(
    short_draft, tokenizer, ids, long_text_module
):
    pc = SpecPC(short_draft, tokenizer, CONFIG)
    length = ids.numel()
    slices = pc.chunk_slices(length)
    assert len(slices) > 5
    with PrefillLog(short_draft) as log:
        out = pc.compress(long_text_module)
    assert out.chunks == len(log.prefills) == len(slices)
    query = ids[-WINDOW:]
    covered = set(range(CHUNK_SINK_TOKENS)) | set(range(length - WINDOW, length))
    for (start, end), fed in zip(slices, log.prefills, strict=True):
        assert fed.numel() + CONFIG.lookahead_tokens == 256  # every chunk fills the draft's window
        assert torch.equal(fed[-WINDOW:], query)  # the question is in every chunk, once
        assert torch.equal(fed[:CHUNK_SINK_TOKENS], ids[:CHUNK_SINK_TOKENS])
        assert torch.equal(fed[CHUNK_SINK_TOKENS:-WINDOW], ids[start:end])
        covered |= set(range(start, end))
    # neighbouring slices share chunk_overlap tokens (the last one, aligned to the window, more)
    assert all(b[0] == a[1] - CONFIG.chunk_overlap for a, b in itertools.pairwise(slices[:-1]))
    assert slices[-1][0] <= slices[-2][1] - CONFIG.chunk_overlap
    assert covered == set(range(length))
    assert bool((out.scores > 0).all())  # every token was scored by some chunk
    # one global selection: the budget, the window, prompt order
    kept = out.kept_positions.tolist()
    assert out.compressed_tokens == 120 and kept == sorted(set(kept))
    assert set(range(length - WINDOW, length)) <= set(kept)
    assert out.lookahead_ids == []  # no pass read the whole prompt


def test_chunks_merge_by_the_maximum_over_the_chunks_holding_a_token(short_draft, tokenizer, ids):
    pc = SpecPC(short_draft, tokenizer, CONFIG)
    slices = pc.chunk_slices(ids.numel())
    merged = pc.score_chunks(ids, slices, 1)
    first = pc.score_chunks(ids, slices[:1], 1)
    second = pc.score_chunks(ids, slices[1:2], 1)
    both = pc.score_chunks(ids, slices[:2], 1)
    torch.testing.assert_close(both, torch.maximum(first, second))
    assert bool((merged >= both).all())


def test_chunk_size_smaller_than_the_drafts_window_also_chunks(draft, tokenizer, ids):
    pc = SpecPC(draft, tokenizer, CONFIG.model_copy(update={"chunk_size": 512}))
    assert pc.chunk_limit() == 512
    assert len(pc.chunk_slices(ids.numel())) > 1
    # a chunk_size past the draft's window is clamped to it
    wide = SpecPC(draft, tokenizer, CONFIG.model_copy(update={"chunk_size": 10**6}))
    assert wide.chunk_limit() == draft.config.max_position_embeddings


def test_a_chunk_size_with_no_room_for_new_tokens_is_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        SpecPCConfig(chunk_size=64 + 1 + CHUNK_SINK_TOKENS)


def test_documents_past_the_drafts_window_are_compressed(short_draft, tokenizer, long_text_module):
    pc = SpecPC(short_draft, tokenizer, CONFIG)
    text = long_text_module
    docs = [text[:3000], "Lambda expressions create anonymous functions.", text[3000:]]
    parts = pc.compress_documents("What do lambda expressions create?", docs, max_capacity_prompt=200)
    assert sum(p.original_tokens for p in parts) > 256
    assert 0 < sum(p.kept_tokens for p in parts) < 200
    for part, doc in zip(parts, docs, strict=True):
        for piece in part.text.split():
            assert piece in doc


def test_specpc_answers_a_prompt_past_the_drafts_window(short_draft, target, tokenizer, long_text_module):
    engine = SpecEngine(target, tokenizer, short_draft, config=CONFIG)
    out = engine.generate(long_text_module, max_new_tokens=4)
    assert out.stats.prompt_tokens > 256
    assert out.stats.target_prefill_tokens == 120
    scored = engine.score(long_text_module)
    assert scored.chunks > 1
    # the scores are the compressor's chunked scores, smoothed
    expected = SpecPC(short_draft, tokenizer, CONFIG).compress(long_text_module)
    torch.testing.assert_close(scored.scores, expected.scores)


@pytest.mark.parametrize("vocabulary", ["shared", "different"])
def test_speckv_pc_works_past_the_drafts_window(
    vocabulary, target, tokenizer, other_tokenizer, long_text_module
):
    draft_tokenizer = tokenizer if vocabulary == "shared" else other_tokenizer
    draft = tiny_model("qwen2", draft_tokenizer, seed=2, layers=2, max_position_embeddings=256)
    config = SpecKVPCConfig(
        specpc=CONFIG.model_copy(update={"max_capacity_prompt": 150}),
        speckv=SpecKVConfig(max_capacity_prompt=64, window_size=8, lookahead_tokens=4),
    )
    engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config=config)
    passes: list[int] = []
    hook = draft.register_forward_pre_hook(
        lambda m, args, kwargs: passes.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with PrefillLog(draft) as log:
        out = engine.generate(long_text_module, max_new_tokens=4)
    hook.remove()
    # each chunk's pass writes SpecPC's one-token lookahead, not SpecKV's four: a chunk's
    # lookahead is never the answer, and every token of it is a draft decode step
    steps_after = [
        len(list(itertools.takewhile(lambda n: n == 1, passes[i + 1 :])))
        for i, n in enumerate(passes)
        if n > 1
    ]
    assert steps_after[:-1] == [CONFIG.lookahead_tokens] * (len(steps_after) - 1)
    assert steps_after[-1] == 3  # SpecKV's lookahead from the kept prompt (its last token needs no pass)
    # and so each chunk is sized for that one token: it fills the draft's window with prompt
    prefills = [n for n in passes if n > 1]
    assert prefills[:-1] == [256 - CONFIG.lookahead_tokens] * (len(prefills) - 1)
    assert out.stats.prompt_tokens > 256
    if vocabulary == "shared":
        assert out.stats.target_prefill_tokens == 150
    else:  # the kept text, re-tokenised by the target's tokenizer
        assert out.stats.target_prefill_tokens < 2 * 150
    assert out.stats.kv_cache_tokens == 64
    # chunks, then one more draft pass: the lookahead written from the kept prompt
    assert len(log.prefills) >= 3 and log.prefills[-1].numel() < 256
    assert out.stats.lookahead_tokens == 4 if vocabulary == "shared" else out.stats.lookahead_tokens > 0


def test_a_compressed_prompt_the_target_cannot_hold_is_refused_before_any_forward(
    draft, tokenizer, long_text_module
):
    small_target = tiny_model("qwen2", tokenizer, seed=1, layers=3, max_position_embeddings=100)
    engine = SpecEngine(small_target, tokenizer, draft, config=CONFIG)  # budget 120 > 100
    refused = pytest.raises(ContextLengthError, match=r"max_capacity_prompt\) to 100 or less")
    with PrefillLog(draft) as draft_log, PrefillLog(small_target) as target_log, refused:
        engine.generate(long_text_module, max_new_tokens=4)
    assert draft_log.prefills == [] and target_log.prefills == []
    # the budget it names works
    fitting = engine.with_config(CONFIG.model_copy(update={"max_capacity_prompt": 100}))
    assert fitting.generate(long_text_module, max_new_tokens=2).stats.target_prefill_tokens == 100


def test_speckv_pc_counts_its_lookahead_in_the_target_fit(draft, tokenizer, long_text_module):
    small_target = tiny_model("qwen2", tokenizer, seed=1, layers=3, max_position_embeddings=140)
    config = SpecKVPCConfig(
        specpc=CONFIG.model_copy(update={"max_capacity_prompt": 140}),
        speckv=SpecKVConfig(max_capacity_prompt=64, window_size=8, lookahead_tokens=10),
    )
    engine = SpecEngine(small_target, tokenizer, draft, config=config)
    with pytest.raises(ContextLengthError, match="130 or less"):
        engine.generate(long_text_module, max_new_tokens=4)


def test_a_sweep_scoring_names_a_fitting_budget_too(draft, tokenizer, long_text_module):
    small_target = tiny_model("qwen2", tokenizer, seed=1, layers=3, max_position_embeddings=100)
    engine = SpecEngine(small_target, tokenizer, draft, config=CONFIG)
    scored = engine.score(long_text_module)
    with pytest.raises(ContextLengthError, match="100 or less"):
        engine.generate_from(scored, budget=110, max_new_tokens=2)
    assert engine.generate_from(scored, budget=90, max_new_tokens=2).stats.target_prefill_tokens == 90


def test_a_prompt_that_fits_only_a_shorter_lookahead_is_one_chunk(short_draft, tokenizer, ids):
    """Past the window with SpecKV's lookahead but not with a chunk's own one token: one chunk
    holding the whole prompt, scored as one pass with that token (and no lookahead returned)."""
    pc = SpecPC(short_draft, tokenizer, CONFIG)
    prompt = ids[:254]  # 254 + 4 > 256 >= 254 + 1
    assert pc.chunk_slices(254, 4) and not pc.chunk_slices(254, 1)
    sinks = min(CHUNK_SINK_TOKENS, 254 - WINDOW)
    assert pc.scoring_slices(254, 4) == [(sinks, 254 - WINDOW)]
    raw, lookahead = pc.score_tokens(prompt, lookahead_tokens=4)
    assert lookahead == []
    whole, _ = pc.score_tokens(prompt, lookahead_tokens=1)
    torch.testing.assert_close(raw, whole.float())


def test_an_error_names_what_to_change_when_chunks_leave_no_room(short_draft, tokenizer, ids):
    update = {"window_size": 252, "max_capacity_prompt": 300}
    pc = SpecPC(short_draft, tokenizer, CONFIG.model_copy(update=update))
    with pytest.raises(InvalidInputError, match="raise chunk_size"):
        pc.chunk_slices(ids.numel())

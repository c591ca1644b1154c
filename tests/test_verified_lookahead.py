"""SpecKV's verified lookahead (the target's scoring prefill checks the draft's tokens), the
draft skipped when the prompt fits the budget, and the lookahead drafted under the answer's
grammar (JSON schema) when draft and target share a vocabulary."""

from __future__ import annotations

import pytest
import torch

from spec_rag import SpecEngine, SpecKVConfig, SpecKVPCConfig, SpecPCConfig
from spec_rag.generation import DecodeResult, SamplingParams, decode_tokens, new_cache

N = 10


def _kv(budget: int = 24, **fields) -> SpecKVConfig:
    return SpecKVConfig(max_capacity_prompt=budget, window_size=8, **fields)


def _count_forwards(model) -> list[int]:
    """Lengths of every forward pass of ``model`` from now on."""
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths


@pytest.fixture
def text(long_text) -> str:
    return long_text[:700]


def test_the_accepted_prefix_and_the_next_token_are_full_inferences_greedy_tokens(
    target, draft, tokenizer, text
):
    full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=N)
    assert len(full.token_ids) == N
    engine = SpecEngine(target, tokenizer, draft, config=_kv())
    for k in (0, 3, 6):
        wrong = (full.token_ids[k] + 1) % len(tokenizer)
        lookahead = [*full.token_ids[:k], wrong, *full.token_ids[k + 1 : N]]
        scored = engine.score(text, max_new_tokens=N, lookahead=lookahead)
        answer = engine.generate_from(scored, max_new_tokens=N)
        assert answer.stats.lookahead_accepted == k
        assert answer.token_ids[: k + 1] == full.token_ids[: k + 1]
        assert answer.stats.kv_cache_tokens == 24  # prompt entries; the k accepted ones come on top
        # the same scoring, sampled: nothing is accepted
        sampled = engine.generate_from(scored, max_new_tokens=N, temperature=1.0, seed=0)
        assert sampled.stats.lookahead_accepted == 0
        # and with verification off, the answer is plain SpecKV's
        plain = engine.with_config(_kv(verify_lookahead=False))
        off = plain.generate_from(plain.score(text, max_new_tokens=N, lookahead=lookahead), max_new_tokens=N)
        assert off.stats.lookahead_accepted == 0


def test_with_the_target_as_its_own_draft_the_whole_answer_is_full_inferences(target, tokenizer, text):
    full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=N)
    target_forwards = _count_forwards(target)
    answer = SpecEngine(target, tokenizer, target, config=_kv()).generate(text, max_new_tokens=N)
    assert answer.stats.lookahead_accepted == N
    assert answer.token_ids == full.token_ids and answer.text == full.text
    # draft: one prefill and N - 1 decode steps; target: one scoring prefill, no decode step at all
    assert target_forwards.count(1) == N - 1
    assert [n for n in target_forwards if n > 1] == [
        answer.stats.prompt_tokens,
        answer.stats.prompt_tokens + N,
    ]
    # a longer answer decodes on from position L + N + 1, on the compressed cache plus the N entries
    longer = SpecEngine(target, tokenizer, target, config=_kv(lookahead_tokens=N)).generate(
        text, max_new_tokens=N + 6
    )
    assert (
        longer.token_ids[: N + 1]
        == SpecEngine(target, tokenizer).generate(text, max_new_tokens=N + 1).token_ids
    )
    assert len(longer.token_ids) == N + 6


def test_speckv_pc_verifies_its_lookahead_too(target, tokenizer, text):
    full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=N)
    pc = SpecPCConfig(max_capacity_prompt=1024, window_size=16, kernel_size=8, neighbor_tokens=8)
    config = SpecKVPCConfig(specpc=pc, speckv=_kv())
    answer = SpecEngine(target, tokenizer, target, config=config).generate(text, max_new_tokens=N)
    assert answer.stats.lookahead_accepted == N and answer.token_ids == full.token_ids


def test_streaming_gives_the_same_verified_text(target, tokenizer, text):
    engine = SpecEngine(target, tokenizer, target, config=_kv(lookahead_tokens=6))
    whole = engine.generate(text, max_new_tokens=N)
    assert whole.stats.lookahead_accepted == 6
    assert "".join(engine.stream(text, max_new_tokens=N)) == whole.text


def test_max_new_tokens_shorter_than_the_accepted_prefix_is_respected(target, tokenizer, text):
    full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=3)
    answer = SpecEngine(target, tokenizer, target, config=_kv(lookahead_tokens=8)).generate(
        text, max_new_tokens=3
    )
    assert answer.token_ids == full.token_ids and len(answer.token_ids) == 3
    assert answer.finish_reason == "length"


def test_eos_inside_the_accepted_tokens_ends_the_answer(target, tokenizer):
    eos = tokenizer.eos_token_id
    result = DecodeResult()
    tokens = list(
        decode_tokens(
            target,
            new_cache(target),
            torch.zeros(len(tokenizer)),
            next_position=3,
            params=SamplingParams(max_new_tokens=8),
            eos_token_ids=[eos],
            result=result,
            accepted=[5, 6, eos, 7],
        )
    )
    assert tokens == [5, 6] and result.finish_reason == "stop"


def test_a_stop_string_inside_the_accepted_tokens_ends_the_answer(target, tokenizer, text):
    full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=N)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip()
    cut = full.text[: full.text.find(stop)]
    answer = SpecEngine(target, tokenizer, target, config=_kv()).generate(text, max_new_tokens=N, stop=stop)
    assert answer.text == cut and answer.finish_reason == "stop"


@pytest.mark.parametrize(
    "config",
    [
        SpecPCConfig(max_capacity_prompt=4096, window_size=16),
        _kv(budget=4096),
        SpecKVPCConfig(
            specpc=SpecPCConfig(max_capacity_prompt=4096, window_size=16),
            speckv=_kv(budget=4096),
        ),
    ],
    ids=["specpc", "speckv", "speckv-pc"],
)
def test_no_draft_pass_when_the_prompt_fits_the_budget(config, target, draft, tokenizer, text):
    draft_forwards = _count_forwards(draft)
    answer = SpecEngine(target, tokenizer, draft, config=config).generate(text, max_new_tokens=6)
    assert draft_forwards == []
    assert answer.token_ids == SpecEngine(target, tokenizer).generate(text, max_new_tokens=6).token_ids


def test_speckv_pc_with_a_prompt_that_fits_the_prompt_budget_is_speckv(target, draft, tokenizer, text):
    kv = _kv(budget=24)
    config = SpecKVPCConfig(specpc=SpecPCConfig(max_capacity_prompt=4096, window_size=16), speckv=kv)
    draft_forwards = _count_forwards(draft)
    cascade = SpecEngine(target, tokenizer, draft, config=config).generate(text, max_new_tokens=6)
    # one draft pass writing the lookahead, with no attention recorded for a prompt cut
    assert draft_forwards[0] == cascade.stats.prompt_tokens and draft_forwards[1:] == [1] * 5
    alone = SpecEngine(target, tokenizer, draft, config=kv).generate(text, max_new_tokens=6)
    assert cascade.token_ids == alone.token_ids
    assert cascade.stats.kv_cache_tokens == alone.stats.kv_cache_tokens == 24


def test_a_specpc_scoring_that_skipped_the_draft_refuses_a_budget_that_would_cut(
    target, draft, tokenizer, text
):
    from spec_rag import InvalidInputError
    from spec_rag.methods import Models, Request
    from spec_rag.methods.specpc import SpecPCMethod

    method = SpecPCMethod(
        SpecPCConfig(max_capacity_prompt=4096, window_size=16),
        Models(target, tokenizer, draft, tokenizer, shared_vocabulary=True),
    )
    request = Request(text, 4)
    scored = method.score(request, 4096)
    assert scored.scores is None
    with pytest.raises(InvalidInputError, match="score the prompt without a budget"):
        method.select(scored, 32, request.stats)


def test_the_cache_keeps_the_accepted_entries_at_their_true_positions(target, tokenizer, text):
    from spec_rag.methods import Models, Request, build_method

    method = build_method(
        _kv(lookahead_tokens=5), Models(target, tokenizer, target, tokenizer, shared_vocabulary=True)
    )
    request = Request(text, 8, greedy=True)
    scored = method.score(request)
    assert scored.accepted == 5
    length = scored.length
    prefilled = method.select(scored, 24, request.stats, greedy=True)
    assert prefilled.next_position == length + 5 and prefilled.accepted == scored.lookahead
    for whole, kept in zip(scored.cache.layers, prefilled.cache.layers, strict=True):
        assert kept.keys.shape[2] == 24 + 5
        assert torch.equal(kept.keys[:, :, 24:], whole.keys[:, :, length : length + 5])
        assert torch.equal(kept.values[:, :, 24:], whole.values[:, :, length : length + 5])
    # sampled: the lookahead's entries are all dropped and decoding starts after the prompt
    sampled = method.select(scored, 24, request.stats, greedy=False)
    assert sampled.next_position == length and sampled.accepted == []
    assert sampled.cache.get_seq_length() == 24


def test_the_prefill_cuts_each_layer_as_soon_as_its_scores_are_known(target, draft, tokenizer, text):
    """With one budget to serve, layer 0's cache is already cut when the last layer runs; a
    scoring for every budget keeps it whole."""
    first_layer: list[int] = []  # layer 0's cache entries as the last layer starts a prefill

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if hidden is not None and hidden.shape[1] > 1 and cache is not None:
            first_layer.append(cache.layers[0].keys.shape[2])

    handle = target.model.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = SpecEngine(target, tokenizer, draft, config=_kv(budget=24, lookahead_tokens=4))
        answer = engine.generate(text, max_new_tokens=4)
        scored = engine.score(text, max_new_tokens=4)
    finally:
        handle.remove()
    length = answer.stats.prompt_tokens
    assert first_layer == [24 + 4, length + 4]
    assert engine.generate_from(scored, max_new_tokens=4).token_ids == answer.token_ids


# -- the lookahead under the answer's grammar ------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["title", "year", "tags"],
}
LOOKAHEAD = 16
_CONFIGS = {
    "speckv": _kv(lookahead_tokens=LOOKAHEAD),
    # the draft pass that cuts the prompt (326 tokens) writes the lookahead
    "speckv-pc": SpecKVPCConfig(
        specpc=SpecPCConfig(max_capacity_prompt=128, window_size=16), speckv=_kv(lookahead_tokens=LOOKAHEAD)
    ),
    # the prompt fits SpecPC's budget: SpecKV's own draft pass writes it
    "speckv-pc-uncut": SpecKVPCConfig(
        specpc=SpecPCConfig(max_capacity_prompt=4096, window_size=16), speckv=_kv(lookahead_tokens=LOOKAHEAD)
    ),
}


@pytest.fixture(scope="module")
def padded_draft(tokenizer):
    """A draft sharing the target's ids whose output layer has 64 rows past the tokenizer's
    vocabulary (as Qwen's embeddings are padded): unconstrained, it may write those ids."""
    from tiny_models import tiny_model

    return tiny_model("qwen2", tokenizer, seed=2, layers=2, vocab_size=len(tokenizer) + 64)


def _guides(tokenizer, schema=SCHEMA):
    from spec_rag.constrained import Constraint, Guide

    constraint = Constraint.json_schema(tokenizer, schema)
    return lambda: Guide(constraint.new_state())


def _method(config, target, draft, tokenizer, draft_tokenizer=None):
    from spec_rag._prompt import same_vocabulary
    from spec_rag.methods import Models, build_method

    draft_tokenizer = draft_tokenizer or tokenizer
    models = Models(
        target,
        tokenizer,
        draft,
        draft_tokenizer,
        shared_vocabulary=same_vocabulary(tokenizer, draft_tokenizer),
        target_eos=[tokenizer.eos_token_id],
        draft_eos=[draft_tokenizer.eos_token_id],
    )
    return build_method(config, models)


def _greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens of ``model`` after ``ids`` (``[L]``), each from a forward of the whole
    sequence (no cache, no mask): the plain draft answer, computed independently."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.cat([ids, torch.tensor(out, dtype=torch.long)])[None]).logits
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_under_a_schema_the_draft_writes_only_tokens_the_grammar_allows(
    name, target, padded_draft, tokenizer, text
):
    from spec_rag.methods import Request

    method = _method(_CONFIGS[name], target, padded_draft, tokenizer)
    guides = _guides(tokenizer)
    free = method.score(Request(text, LOOKAHEAD)).lookahead
    assert len(free) == LOOKAHEAD and guides().count_accepted(free) < len(free)  # the grammar matters
    lookahead = method.score(Request(text, LOOKAHEAD, guide=guides)).lookahead
    assert len(lookahead) == LOOKAHEAD
    assert guides().count_accepted(lookahead) == len(lookahead)
    assert max(lookahead) < len(tokenizer)  # never a padding row of the draft's output layer
    assert tokenizer.decode(lookahead).startswith('{"title": "')


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_an_unconstrained_request_drafts_as_before(name, target, padded_draft, tokenizer, text):
    """No grammar: the lookahead is the draft's plain greedy answer, padding rows and all."""
    from spec_rag._prompt import encode_prompt
    from spec_rag.methods import Request

    method = _method(_CONFIGS[name], target, padded_draft, tokenizer)
    ids = encode_prompt(tokenizer, text)["input_ids"]
    assert method.score(Request(text, LOOKAHEAD)).lookahead == _greedy(padded_draft, ids, LOOKAHEAD)


def test_a_draft_with_another_vocabulary_drafts_unconstrained(target, tokenizer, other_tokenizer, text):
    """The grammar masks the target's ids: a draft of another vocabulary is not guided (its
    lookahead, handed over as text, is the same with or without a grammar)."""
    from tiny_models import tiny_model

    from spec_rag.methods import Request

    draft = tiny_model("qwen2", other_tokenizer, seed=2, layers=2)
    method = _method(_CONFIGS["speckv"], target, draft, tokenizer, other_tokenizer)
    free = method.score(Request(text, LOOKAHEAD)).lookahead
    assert free and method.score(Request(text, LOOKAHEAD, guide=_guides(tokenizer))).lookahead == free


@pytest.mark.parametrize("name", ["speckv", "speckv-pc-uncut"])
def test_the_target_as_its_own_draft_under_a_schema_writes_the_constrained_answer(
    name, target, tokenizer, text
):
    """Self-drafted under the schema, the lookahead is the target's constrained greedy answer:
    verified against the target's constrained choice, all of it is accepted, and the answer is
    full inference's under the schema token for token (the accepted tokens and the target's next
    one). A lookahead written without the grammar (engine.score, then an answer under the
    schema) opens with a token the schema forbids: none of it is accepted."""
    n = LOOKAHEAD + 1
    full = SpecEngine(target, tokenizer).generate(text, response_format=SCHEMA, max_new_tokens=n)
    assert len(full.token_ids) == n  # the schema's answer is longer than the lookahead
    engine = SpecEngine(target, tokenizer, target, config=_CONFIGS[name])
    answer = engine.generate(text, response_format=SCHEMA, max_new_tokens=n)
    assert answer.stats.lookahead_accepted == LOOKAHEAD
    assert answer.token_ids == full.token_ids
    unguided = engine.generate_from(
        engine.score(text, max_new_tokens=n), response_format=SCHEMA, max_new_tokens=n
    )
    assert unguided.stats.lookahead_accepted == 0


def test_the_token_the_grammar_completes_on_is_fed_when_asked(target, tokenizer):
    """``feed_last``: the draft's last lookahead token reaches the model (so a recorder sees its
    query) also when the grammar ends the lookahead."""
    from spec_rag.constrained import Constraint, Guide

    constraint = Constraint.lark(tokenizer, "start: <[40]> <[41]>")
    for feed_last, fed in ((True, [1, 1]), (False, [1])):
        lengths: list[int] = []
        handle = target.register_forward_pre_hook(
            lambda m, args, kwargs, lengths=lengths: lengths.append(kwargs["input_ids"].shape[1]),
            with_kwargs=True,
        )
        result = DecodeResult()
        try:
            tokens = list(
                decode_tokens(
                    target,
                    new_cache(target),
                    torch.zeros(len(tokenizer)),
                    next_position=0,
                    params=SamplingParams(max_new_tokens=8),
                    eos_token_ids=[tokenizer.eos_token_id],
                    result=result,
                    feed_last=feed_last,
                    guide=Guide(constraint.new_state()),
                )
            )
        finally:
            handle.remove()
        assert tokens == [40, 41] and result.finish_reason == "stop" and lengths == fed


# -- sampled answers: the lookahead verified by the answer's own draws ------------------------

SAMPLING = [
    pytest.param({"temperature": 1.0}, id="t1"),
    pytest.param({"temperature": 0.7, "top_k": 40, "top_p": 0.9}, id="t0.7-topk-topp"),
]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_a_sampled_answer_opens_with_the_draws_of_full_cache_sampling(sampling, target, tokenizer, text):
    """Drawn with the answer's sampler, the verification accepts the draft's tokens while the
    draws equal them; the draw that disagreed is made again by the decoding: the first ``k + 1``
    tokens are full-cache sampling's with the same seed, token for token."""
    from spec_rag.generation import Sampler
    from spec_rag.methods import Request

    method = _method(_kv(), target, target, tokenizer)
    for seed in (0, 1):
        full = SpecEngine(target, tokenizer).generate(text, max_new_tokens=N, seed=seed, **sampling)
        assert len(full.token_ids) == N
        for k in (0, 3, N - 1, N):
            lookahead = list(full.token_ids)
            if k < N:
                lookahead[k] = (lookahead[k] + 1) % len(tokenizer)  # a token the draws will not make
            params = SamplingParams(max_new_tokens=N, seed=seed, **sampling)
            sampler = Sampler(params)
            request = Request(text, N, lookahead=lookahead, sampler=sampler)
            scored = method.score(request)
            assert scored.accepted == k and scored.sampled
            # a greedy answer from these scores accepts none of it: its draws were the sampler's
            assert method.select(scored, 24, request.stats, greedy=True).accepted == []
            prefilled = method.select(scored, 24, request.stats)
            assert prefilled.accepted == lookahead[:k] and request.stats.lookahead_accepted == k
            answer = list(
                decode_tokens(
                    target,
                    prefilled.cache,
                    prefilled.logits,
                    next_position=prefilled.next_position,
                    params=params,
                    eos_token_ids=[tokenizer.eos_token_id],
                    accepted=prefilled.accepted,
                    sampler=sampler,
                )
            )
            assert answer[: k + 1] == full.token_ids[: k + 1]
            assert len(answer) == N


@pytest.mark.parametrize("cascade", [False, True], ids=["speckv", "speckv-pc"])
def test_the_engine_verifies_a_sampled_answer_with_its_own_seed(cascade, target, tokenizer, text):
    """End to end (the target as its own draft): a sampled SpecKV (or SpecKV-PC) answer opens
    with full-cache sampling's tokens for the same seed, as far as the draws accepted the greedy
    lookahead plus one; seeded answers repeat, streamed or not. ``top_k=1`` samples the greedy
    answer, all of which the draws accept."""
    full = SpecEngine(target, tokenizer)
    config = _kv()
    if cascade:  # SpecPC's pass writes the lookahead (its budget holds the prompt: the target reads all)
        pc = SpecPCConfig(max_capacity_prompt=1024, window_size=16, kernel_size=8, neighbor_tokens=8)
        config = SpecKVPCConfig(specpc=pc, speckv=_kv())
    engine = SpecEngine(target, tokenizer, target, config=config)
    accepted = []
    for seed in range(4):
        expected = full.generate(text, max_new_tokens=N, temperature=0.3, seed=seed)
        answer = engine.generate(text, max_new_tokens=N, temperature=0.3, seed=seed)
        k = answer.stats.lookahead_accepted
        accepted.append(k)
        assert answer.token_ids[: k + 1] == expected.token_ids[: k + 1]
        again = engine.generate(text, max_new_tokens=N, temperature=0.3, seed=seed)
        assert again.token_ids == answer.token_ids
        assert "".join(engine.stream(text, max_new_tokens=N, temperature=0.3, seed=seed)) == answer.text
    assert max(accepted) > 0  # some draws agreed with the draft
    greedy = full.generate(text, max_new_tokens=N)
    one = engine.generate(text, max_new_tokens=N, temperature=1.0, top_k=1, seed=0)
    assert one.stats.lookahead_accepted == N and one.token_ids == greedy.token_ids


def test_a_sampled_answer_under_a_schema_is_verified_under_it(target, tokenizer, text):
    """Under a JSON schema the draws are made from the grammar's masked logits, as constrained
    sampling makes them: the self-drafted constrained lookahead opens the answer, which is
    full-cache constrained sampling's (same seed) as far as the draws accepted it, plus one."""
    n = LOOKAHEAD + 1
    full = SpecEngine(target, tokenizer)
    engine = SpecEngine(target, tokenizer, target, config=_CONFIGS["speckv"])
    one = engine.generate(text, response_format=SCHEMA, max_new_tokens=n, temperature=1.0, top_k=1, seed=0)
    assert one.stats.lookahead_accepted == LOOKAHEAD
    assert one.token_ids == full.generate(text, response_format=SCHEMA, max_new_tokens=n).token_ids
    for seed in range(3):
        expected = full.generate(text, response_format=SCHEMA, max_new_tokens=n, temperature=0.5, seed=seed)
        answer = engine.generate(text, response_format=SCHEMA, max_new_tokens=n, temperature=0.5, seed=seed)
        k = answer.stats.lookahead_accepted
        assert answer.token_ids[: k + 1] == expected.token_ids[: k + 1]

"""SpecEngine: every method, exactness where it must be exact, and clear errors."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from spec_rag import (
    ContextLengthError,
    InvalidInputError,
    SnapKVConfig,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    StreamingLLMConfig,
)
from spec_rag.generation import SamplingParams, TextStream

KV = SpecKVConfig(max_capacity_prompt=48, window_size=8)
PC = SpecPCConfig(max_capacity_prompt=96, window_size=16, kernel_size=8, neighbor_tokens=8)
CASCADE = SpecKVPCConfig(specpc=PC, speckv=KV)
ALL_CONFIGS = [
    None,
    PC,
    KV,
    SnapKVConfig(max_capacity_prompt=48, window_size=8),
    StreamingLLMConfig(max_capacity_prompt=48),
    CASCADE,
]


def _reference_greedy(model, tokenizer, text, n):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_inference_matches_greedy_model_generate(arch, tokenizer, long_text):
    model = tiny_model(arch, tokenizer, seed=7)
    text = long_text[:1500]
    gen = SpecEngine(model, tokenizer).generate(text, max_new_tokens=12)
    assert gen.token_ids == [
        t for t in _reference_greedy(model, tokenizer, text, 12) if t != tokenizer.eos_token_id
    ]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_speckv_with_budget_at_least_the_prompt_matches_model_generate(arch, tokenizer, long_text):
    target = tiny_model(arch, tokenizer, seed=8)
    draft = tiny_model(arch, tokenizer, seed=9)
    text = long_text[:800]
    length = len(tokenizer(text)["input_ids"])
    engine = SpecEngine(target, tokenizer, draft=draft, config=SpecKVConfig(max_capacity_prompt=length))
    gen = engine.generate(text, max_new_tokens=12)
    reference = _reference_greedy(target, tokenizer, text, 12)
    if tokenizer.eos_token_id in reference:  # the engine stops at EOS and does not return it
        reference = reference[: reference.index(tokenizer.eos_token_id)]
        assert gen.finish_reason == "stop"
    assert gen.token_ids == reference and len(reference) > 0
    assert gen.stats.kv_cache_tokens == length


def test_speckv_below_the_prompt_keeps_exactly_c_entries_per_head_with_the_window(
    target, draft, tokenizer, long_text
):
    engine = SpecEngine(
        target, tokenizer, draft=draft, config=SpecKVConfig(max_capacity_prompt=40, window_size=8)
    )
    ids = tokenizer(long_text)["input_ids"]
    import spec_rag.methods.base as base_module

    kept: list[torch.Tensor] = []  # each layer's [kv_heads, C] selection
    lengths: list[list[int]] = []  # each layer's cache entries when decoding starts
    select_positions, select = base_module.select_kv_positions, engine._method.select

    def spy_positions(*args, **kwargs):
        kept.append(select_positions(*args, **kwargs))
        return kept[-1]

    def spy_select(*args, **kwargs):
        prefilled = select(*args, **kwargs)
        lengths.append([layer.keys.shape[2] for layer in prefilled.cache.layers])
        lengths.append([layer.values.shape[2] for layer in prefilled.cache.layers])
        return prefilled

    base_module.select_kv_positions = spy_positions
    engine._method.select = spy_select  # type: ignore[method-assign]
    try:
        gen = engine.generate(long_text, max_new_tokens=4)
    finally:
        base_module.select_kv_positions = select_positions
    accepted = gen.stats.lookahead_accepted  # the verified lookahead's entries come on top
    assert lengths == [[40 + accepted] * target.config.num_hidden_layers] * 2
    positions = torch.stack(kept)  # [layers, kv_heads, C]
    assert positions.shape == (target.config.num_hidden_layers, target.config.num_key_value_heads, 40)
    window = set(range(len(ids) - 8, len(ids)))
    for layer in positions:
        for head in layer:
            assert window <= set(head.tolist())
            assert int(head.max()) < len(ids)  # the lookahead's own entries are dropped
    assert gen.stats.kv_cache_tokens == 40
    assert gen.stats.lookahead_tokens > 0


def test_decoding_after_compression_uses_true_rope_positions(target, draft, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer, draft=draft, config=KV)
    length = len(tokenizer(long_text)["input_ids"])
    seen: list[list[int]] = []

    def capture(module, args, kwargs):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(position_ids[0].tolist())

    handle = target.model.rotary_emb.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        gen = engine.generate(long_text, max_new_tokens=5, temperature=0.0)
    finally:
        handle.remove()
    decode_positions = [p for p in seen if len(p) == 1]
    assert len(gen.token_ids) == 5
    assert decode_positions == [[length + i] for i in range(4)]  # not the cache length (48)


def test_the_cache_goes_under_the_name_the_model_takes(target, draft, tokenizer, long_text):
    # transformers renamed ``past_key_values`` to ``cache`` and warns on the old name.
    expected = "cache" if "cache" in inspect.signature(type(target).forward).parameters else "past_key_values"
    names: list[set[str]] = []

    def capture(module, args, kwargs):
        names.append(set(kwargs))

    handle = target.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        SpecEngine(target, tokenizer, draft=draft, config=KV).generate(long_text, max_new_tokens=3)
    finally:
        handle.remove()
    assert names and all(expected in called for called in names)
    (other,) = {"cache", "past_key_values"} - {expected}
    assert not any(other in called for called in names)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: "full" if c is None else c.method)
def test_every_method_answers_and_reports_comparable_stats(config, target, draft, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer, draft=draft, config=config)
    gen = engine.generate(long_text, max_new_tokens=6)
    stats = gen.stats
    length = len(tokenizer(long_text)["input_ids"])
    assert stats.method == engine.method
    assert stats.prompt_tokens == length
    assert stats.output_tokens == len(gen.token_ids) > 0
    assert stats.total_s >= stats.decode_s > 0
    expected_prefill = {"specpc": 96, "speckv-pc": 96}.get(engine.method, length)
    assert stats.target_prefill_tokens == expected_prefill
    expected_cache = {"full": length, "specpc": 96}.get(engine.method, 48)
    assert stats.kv_cache_tokens == expected_cache
    if engine.method in ("specpc", "speckv", "speckv-pc"):
        assert stats.draft_s > 0
    else:
        assert stats.draft_s == 0


def test_chat_messages_use_the_chat_template(target, tokenizer):
    engine = SpecEngine(target, tokenizer)
    messages = [{"role": "user", "content": "What is a lambda?"}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.generate(messages, max_new_tokens=5).stats.prompt_tokens == len(
        tokenizer(templated, add_special_tokens=False)["input_ids"]
    )


def test_sampling_is_reproducible_with_a_seed_and_varies_without(target, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer)
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = engine.generate(long_text[:500], seed=11, **kwargs).token_ids
    b = engine.generate(long_text[:500], seed=11, **kwargs).token_ids
    others = {tuple(engine.generate(long_text[:500], seed=s, **kwargs).token_ids) for s in range(12, 16)}
    assert a == b
    assert len(others | {tuple(a)}) > 1


def test_stop_string_ends_the_answer_before_it(target, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer)
    free = engine.generate(long_text[:500], max_new_tokens=20)
    assert len(free.text) > 6
    stop = free.text[4:6]
    cut = engine.generate(long_text[:500], max_new_tokens=20, stop=[stop])
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_stream_deltas_add_up_to_the_generated_text(target, draft, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer, draft=draft, config=KV)
    stream = engine.stream(long_text, max_new_tokens=10)
    deltas = list(stream)
    assert "".join(deltas) == stream.generation.text == engine.generate(long_text, max_new_tokens=10).text
    assert stream.generation.stats.kv_cache_tokens == 48


def test_text_stream_holds_back_a_possible_stop_string():
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    stream = TextStream(Chars(), stop=["END"])
    out = [stream.push(ord(c)) for c in "abEN"]
    assert "".join(out) == "ab"  # "EN" might become "END"
    assert stream.push(ord("D")) == "" and stream.stopped and stream.text == "ab"


def test_a_list_of_prompts_gives_one_generation_each(target, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer)
    prompts = [long_text[:300], long_text[300:700]]
    batch = engine.generate(prompts, max_new_tokens=6)
    assert [g.token_ids for g in batch] == [engine.generate(p, max_new_tokens=6).token_ids for p in prompts]


def test_draft_with_a_different_tokenizer_hands_over_text(target, tokenizer, other_tokenizer, long_text):
    draft = tiny_model("llama", other_tokenizer, seed=12)
    for config in (PC, KV, CASCADE):
        engine = SpecEngine(target, tokenizer, draft=draft, draft_tokenizer=other_tokenizer, config=config)
        assert not engine.shared_vocabulary
        gen = engine.generate([{"role": "user", "content": long_text}], max_new_tokens=6)
        if config is not KV:
            assert gen.stats.target_prefill_tokens < gen.stats.prompt_tokens
        if config is not PC:
            assert gen.stats.kv_cache_tokens == 48 and gen.stats.lookahead_tokens > 0


def test_one_engine_serves_several_threads(target, draft, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer, draft=draft, config=KV)
    prompts = [long_text[i * 300 : i * 300 + 900] for i in range(6)]
    alone = [engine.generate(p, max_new_tokens=8).text for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def work(i):
        together[i] = engine.generate(prompts[i], max_new_tokens=8).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_zero_new_tokens_returns_empty_without_running_models(target, tokenizer):
    gen = SpecEngine(target, tokenizer).generate("hello", max_new_tokens=0)
    assert gen.text == "" and gen.token_ids == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "the prompt is empty"),
        ("   ", "the prompt is empty"),
        ([], "must be a string or a list of chat messages"),
        ([{"role": "user", "content": ""}], "every chat message is empty"),
        (42, "must be a string or a list of chat messages"),
    ],
)
def test_empty_or_malformed_prompts_are_refused(bad, message, target, tokenizer):
    with pytest.raises(InvalidInputError, match=message):
        SpecEngine(target, tokenizer).generate(bad, max_new_tokens=3)


def test_methods_that_need_a_draft_say_so(target, tokenizer):
    with pytest.raises(InvalidInputError, match="needs a draft"):
        SpecEngine(target, tokenizer, config=KV)


def test_prompt_longer_than_the_context_is_a_clear_error(tokenizer, long_text):
    short = tiny_model("llama", tokenizer, max_position_embeddings=64)
    with pytest.raises(ContextLengthError, match="context window is 64"):
        SpecEngine(short, tokenizer).generate(long_text, max_new_tokens=2)


def test_a_lookahead_past_the_drafts_window_names_the_answer_length_that_fits(target, tokenizer, long_text):
    short = tiny_model("qwen2", tokenizer, seed=2, layers=2, max_position_embeddings=256)
    engine = SpecEngine(target, tokenizer, short, config=KV)
    ids = tokenizer(long_text)["input_ids"][:250]
    prompt = tokenizer.decode(ids)
    length = engine.score(prompt, max_new_tokens=1).stats.prompt_tokens
    room = 256 - length
    assert room > 0
    message = rf"lookahead {room + 4} more.*max_new_tokens.* to {room} or less"
    with pytest.raises(ContextLengthError, match=message):
        engine.generate(prompt, max_new_tokens=room + 4)
    assert len(engine.generate(prompt, max_new_tokens=room).token_ids) > 0


def test_tokenizer_that_does_not_fit_the_model_is_refused(tokenizer, other_tokenizer):
    small = tiny_model("llama", tokenizer)
    with pytest.raises(InvalidInputError, match="do not belong together"):
        SpecEngine(small, other_tokenizer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be 0 or more"),
        (dict(temperature=-0.1), "temperature must be 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_arguments_are_refused(kwargs, message, target, tokenizer):
    with pytest.raises(InvalidInputError, match=message):
        SpecEngine(target, tokenizer).generate("hello", **kwargs)


def test_sampling_params_greedy_when_temperature_is_zero_or_none():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=None).greedy
    assert not SamplingParams(temperature=0.5).greedy

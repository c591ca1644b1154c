"""The KV-cache methods never evict a tool prompt's template structure (tool definitions, earlier
calls, call and result tags): SnapKV, SpecKV, StreamingLLM and SpecKV-PC keep its entries in
every layer and KV head, inside the budget, whether the prefill cuts each layer (one budget) or a
scoring is cut afterwards (any budget); a budget too small for it is refused before any cache is
cut; prompts without tools keep exactly what they kept before."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spec_rag import (
    InvalidInputError,
    SnapKVConfig,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    StreamingLLMConfig,
)
from spec_rag._prompt import encode_prompt, with_tools
from spec_rag.generation import GenerationStats
from spec_rag.methods.base import Request, ScoredCache
from spec_rag.scoring import pool_scores
from spec_rag.selection import select_kv_positions, streaming_positions
from spec_rag.specpc import tool_structure_tokens
from spec_rag.testing import corpus_text, tiny_model, tiny_tools_tokenizer

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the archive.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
TOOLS = [SEARCH]
CONVERSATION = [
    {"role": "user", "content": "Find the vault code in the archive."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": {"query": "vault"}},
            }
        ],
    },
    {"role": "tool", "content": corpus_text(1500), "tool_call_id": "call_1", "name": "search"},
]
PROMPT = with_tools(CONVERSATION, TOOLS)
WINDOW, SINKS, LOOKAHEAD = 8, 4, 8
PC = SpecPCConfig(max_capacity_prompt=600, window_size=16)
METHODS = ("snapkv", "speckv", "streamingllm", "speckv-pc")
#: Text the template writes around the contents, every piece of which the target must keep.
STRUCTURE = (
    "<tools>",
    '"name": "search"',
    '<tool_call>\n{"name": "search", "arguments": {"query": "vault"}}\n</tool_call><|im_end|>',
    "<|im_start|>user\n<tool_response>\n",
    "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)


def config(name: str, budget: int) -> Any:
    if name == "snapkv":
        return SnapKVConfig(max_capacity_prompt=budget, window_size=WINDOW)
    if name == "streamingllm":
        return StreamingLLMConfig(max_capacity_prompt=budget, sink_tokens=SINKS)
    speckv = SpecKVConfig(max_capacity_prompt=budget, window_size=WINDOW, lookahead_tokens=LOOKAHEAD)
    return speckv if name == "speckv" else SpecKVPCConfig(specpc=PC, speckv=speckv)


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tools_tokenizer()


@pytest.fixture(scope="module")
def models(tok) -> tuple[Any, Any]:
    return tiny_model(tok, seed=1, layers=2), tiny_model(tok, seed=2, layers=1)


def engine_for(models: tuple[Any, Any], tok: Any, name: str, budget: int = 512) -> SpecEngine:
    return SpecEngine(models[0], tok, models[1], config=config(name, budget))


def whole(engine: SpecEngine) -> ScoredCache:
    """The method's scoring of ``PROMPT`` for every budget: the target's whole cache, never cut."""
    scored = engine._method.score(Request(PROMPT, LOOKAHEAD))
    assert isinstance(scored, ScoredCache) and scored.cut is None
    return scored


def always_kept(name: str, scored: ScoredCache) -> set[int]:
    """The prompt positions ``name`` must keep at any budget: the tool structure, and the window
    (the attention sinks for StreamingLLM)."""
    assert scored.protected is not None and scored.protected.shape == (scored.length,)
    positions = set(torch.nonzero(scored.protected).flatten().tolist())
    if name == "streamingllm":
        return positions | set(range(SINKS))
    return positions | set(range(scored.length - WINDOW, scored.length))


def kept_positions(cache: Any, reference: ScoredCache) -> list[list[set[int]]]:
    """Per layer and KV head, the prompt positions whose entries ``cache`` holds, found by matching
    its keys to those of the whole-prompt cache of ``reference`` (the same prefill, never cut)."""
    kept = []
    for layer, full in zip(cache.layers, reference.cache.layers, strict=True):
        keys = layer.keys[0].float()  # [kv_heads, C, head_dim]
        prompt_keys = full.keys[0, :, : reference.length].float()  # [kv_heads, L, head_dim]
        distances = torch.cdist(keys, prompt_keys, compute_mode="donot_use_mm_for_euclid_dist")  # [kv, C, L]
        nearest = distances.min(dim=-1)  # [kv_heads, C]
        assert float(nearest.values.max()) < 1e-4  # every entry kept is one of the prompt's own
        kept.append([set(head.tolist()) for head in nearest.indices])
    return kept


@pytest.mark.parametrize("path", ["cut in the prefill", "cut from a scoring"])
@pytest.mark.parametrize("extra", [0, 24])
@pytest.mark.parametrize("name", METHODS)
def test_every_layer_and_head_keeps_the_tool_structure_inside_the_budget(tok, models, name, extra, path):
    reference = whole(engine_for(models, tok, name))
    forced = always_kept(name, reference)
    budget = len(forced) + extra  # the smallest budget that holds them, then some scored entries
    assert budget < reference.length
    method = engine_for(models, tok, name, budget)._method
    if path == "cut in the prefill":
        stats = GenerationStats()
        prefilled = method.prefill(Request(PROMPT, LOOKAHEAD, stats))
    else:
        stats = replace(reference.stats)
        prefilled = method.select(reference, budget, stats)
    assert stats.kv_cache_tokens == budget
    layers = kept_positions(prefilled.cache, reference)
    assert len(layers) == 2 and all(len(heads) == 2 for heads in layers)
    for heads in layers:
        for head in heads:
            assert len(head) == budget
            assert forced <= head, sorted(forced - head)[:10]
    if extra and name != "streamingllm":  # the scored rest differs between heads or layers
        assert len({frozenset(head) for heads in layers for head in heads}) > 1


@pytest.mark.parametrize("shared", [True, False], ids=["shared vocabulary", "text hand-off"])
def test_speckv_pc_protects_the_structure_of_the_compressed_prompt_the_target_prefills(tok, models, shared):
    draft_tok = tok if shared else tiny_tools_tokenizer(700)
    draft = models[1] if shared else tiny_model(draft_tok, seed=2, layers=1)
    engine = SpecEngine(models[0], tok, draft, draft_tok, config=config("speckv-pc", 512))
    assert engine._method.models.shared_vocabulary is shared
    specpc = engine._method.specpc  # type: ignore[attr-defined]
    request = Request(PROMPT, LOOKAHEAD)
    tokens = specpc.score(request, lookahead_tokens=LOOKAHEAD)
    ids, _, protected = specpc.cut_prompt(tokens, PC.max_capacity_prompt, request.stats)
    assert protected is not None and protected.shape == ids.shape
    full = encode_prompt(tok, PROMPT, offsets=True)
    assert ids.numel() < full["input_ids"].numel()  # the tool result was cut
    structure, content = tok.decode(ids[protected]), tok.decode(ids[~protected])
    for piece in STRUCTURE:
        assert piece in structure, piece
    assert "<tools>" not in content and "<tool_response>" not in content and '"search"' not in content
    if shared:  # the draft's own tokens: the structure survived SpecPC whole
        assert int(protected.sum()) == int(tool_structure_tokens(PROMPT, full).sum())
    scored = engine._method.score(Request(PROMPT, LOOKAHEAD))
    assert isinstance(scored, ScoredCache) and scored.length == ids.numel()
    assert torch.equal(scored.protected, protected)


@pytest.mark.parametrize(
    "prompt",
    [[{"role": "user", "content": corpus_text(2000)}], corpus_text(2000)],
    ids=["chat without tools", "string"],
)
@pytest.mark.parametrize("name", METHODS)
def test_a_prompt_without_tools_keeps_what_it_kept_before(tok, models, name, prompt):
    engine = engine_for(models, tok, name)
    scored = engine._method.score(Request(prompt, LOOKAHEAD))
    assert isinstance(scored, ScoredCache) and scored.protected is None
    # The protected path with nothing to protect selects exactly what the plain path selects.
    unprotected = replace(scored, protected=torch.zeros(scored.length, dtype=torch.bool))
    for budget in (48, 160):
        method = engine.with_config(config(name, budget))._method
        plain = method.select(scored, budget, GenerationStats())
        other = method.select(unprotected, budget, GenerationStats())
        assert torch.equal(plain.logits, other.logits)
        for a, b in zip(plain.cache.layers, other.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        cut = method.prefill(Request(prompt, LOOKAHEAD))  # the one-budget path keeps the same
        assert kept_positions(cut.cache, scored) == kept_positions(plain.cache, scored)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 120), st.integers(0, 12), st.integers(1, 130), st.sampled_from([1, 3, 7]))
def test_an_empty_protected_mask_selects_as_none_does(length, window, capacity, kernel):
    window = min(window, capacity)
    if capacity >= length:
        return  # the methods do not select then
    scores = torch.rand(2, length)
    nothing = torch.zeros(length, dtype=torch.bool)
    kwargs = {"window_size": window, "kernel_size": kernel, "pool_type": "max"}
    assert torch.equal(
        select_kv_positions(scores, length, capacity, protected=nothing, **kwargs),
        select_kv_positions(scores, length, capacity, **kwargs),
    )
    sinks = min(window, capacity)
    assert torch.equal(
        streaming_positions(length, capacity, sinks, nothing), streaming_positions(length, capacity, sinks)
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 120), st.integers(0, 8), st.data())
def test_protected_positions_are_kept_by_every_head_and_count_in_the_budget(length, window, data):
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    forced = protected.clone()
    forced[length - window :] = True
    floor = int(forced.sum())
    capacity = data.draw(st.integers(max(floor, 1), length))
    if capacity >= length:
        return
    scores = torch.rand(3, length)
    kept = select_kv_positions(
        scores, length, capacity, window_size=window, kernel_size=3, pool_type="max", protected=protected
    )
    assert kept.shape == (3, capacity)
    for head in kept:
        assert torch.equal(head, head.unique())  # sorted, no repeats
        assert set(torch.nonzero(forced).flatten().tolist()) <= set(head.tolist())
    # the rest are each head's top-scored positions among the others (by pooled score)
    free = ~forced[: length - window]
    for head_scores, head in zip(pool_scores(scores[:, : length - window], 3, "max"), kept, strict=True):
        chosen = torch.zeros_like(free)
        chosen[head[head < length - window]] = True
        chosen &= free
        assert int(chosen.sum()) == capacity - floor
        if chosen.any() and (free & ~chosen).any():
            assert float(head_scores[chosen].min()) >= float(head_scores[free & ~chosen].max())
    sinks = min(2, length)
    stream_forced = protected.clone()
    stream_forced[:sinks] = True
    if int(stream_forced.sum()) <= capacity:
        positions = streaming_positions(length, capacity, sinks, protected)
        assert positions.numel() == capacity and torch.equal(positions, positions.unique())
        rest = sorted(set(positions.tolist()) - set(torch.nonzero(stream_forced).flatten().tolist()))
        free = torch.nonzero(~stream_forced).flatten().tolist()
        assert rest == free[len(free) - len(rest) :]  # the most recent of the others


@pytest.mark.parametrize("name", METHODS)
def test_a_budget_below_the_structure_is_refused_naming_the_smallest_that_fits(tok, models, name):
    engine = engine_for(models, tok, name)
    floor = len(always_kept(name, whole(engine)))
    message = rf"budget \({floor - 1}\) cannot hold.*tool prompt's template structure.*to {floor} or more"
    small = engine.with_config(config(name, floor - 1))
    prefills: list[int] = []
    handle = models[0].register_forward_pre_hook(
        lambda m, args, kwargs: prefills.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with pytest.raises(InvalidInputError, match=message):
            small.generate(CONVERSATION, tools=TOOLS, max_new_tokens=4)
    finally:
        handle.remove()
    assert prefills == []  # refused before the target read the prompt
    assert (
        engine.with_config(config(name, floor))
        .generate(CONVERSATION, tools=TOOLS, max_new_tokens=4)
        .token_ids
    )
    # A scoring kept for every budget refuses it too, and still answers at the others unharmed.
    scored = engine.score(CONVERSATION, tools=TOOLS, max_new_tokens=LOOKAHEAD)
    entries = scored.cache.get_seq_length()  # type: ignore[attr-defined]
    before = engine.generate_from(scored, budget=floor, max_new_tokens=6)
    with pytest.raises(InvalidInputError, match=message):
        engine.generate_from(scored, budget=floor - 1, max_new_tokens=6)
    assert scored.cache.get_seq_length() == entries  # type: ignore[attr-defined]
    after = engine.generate_from(scored, budget=floor, max_new_tokens=6)
    assert after.token_ids == before.token_ids and after.stats.kv_cache_tokens == floor

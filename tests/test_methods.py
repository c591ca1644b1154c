"""The method registry, and one scoring serving every budget through the public API."""

from __future__ import annotations

import inspect

import pytest
import torch

import spec_rag.engine as engine_module
from spec_rag import (
    METHODS,
    InvalidInputError,
    SnapKVConfig,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    StreamingLLMConfig,
    config_for_method,
    method_info,
)
from spec_rag.methods import Models, build_method

BUDGETS = (16, 40, 72)


def _spy_cuts(monkeypatch) -> list[torch.Tensor]:
    """Every layer's ``[kv_heads, C]`` KV selection, in order, whether the prefill cuts each layer
    as its scores come (one budget) or a scoring is cut afterwards (any budget)."""
    import spec_rag.methods.base as base_module

    cuts: list[torch.Tensor] = []
    original = base_module.select_kv_positions

    def spy(*args, **kwargs):
        cuts.append(original(*args, **kwargs).clone())
        return cuts[-1]

    monkeypatch.setattr(base_module, "select_kv_positions", spy)
    return cuts


def _count_prefills(model) -> list[int]:
    """Lengths of the forward passes over more than one token (prefills, not decode steps)."""
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (
            lengths.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None
        ),
        with_kwargs=True,
    )
    return lengths


def test_every_method_is_built_from_its_config_and_declares_its_config_capabilities(target, draft, tokenizer):
    models = Models(target, tokenizer, draft, tokenizer, shared_vocabulary=True)
    configs = {
        "full": None,
        "specpc": SpecPCConfig(),
        "speckv": SpecKVConfig(),
        "speckv-pc": SpecKVPCConfig(),
        "snapkv": SnapKVConfig(),
        "streamingllm": StreamingLLMConfig(),
    }
    assert set(configs) == set(METHODS)
    for name, config in configs.items():
        method = build_method(config, models)
        assert method.name == name and method.info == method_info(name)
        assert type(method).__module__ == f"spec_rag.methods.{name.replace('-', '_')}"
    # the engine maps config -> method through the config alone
    assert "isinstance(config" not in inspect.getsource(engine_module)


def test_speckv_pc_is_the_composition_of_specpc_and_speckv(target, draft, tokenizer):
    from spec_rag.methods.speckv import SpecKV
    from spec_rag.methods.specpc import SpecPCMethod

    models = Models(target, tokenizer, draft, tokenizer, shared_vocabulary=True)
    cascade = build_method(SpecKVPCConfig(), models)
    assert isinstance(cascade.specpc, SpecPCMethod) and isinstance(cascade.speckv, SpecKV)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "method, fields, message",
    [
        ("streamingllm", {"window_size": 8}, "'streamingllm' takes no window_size"),
        ("snapkv", {"lookahead_tokens": 2}, "'snapkv' takes no lookahead_tokens"),
        ("speckv", {"prompt_capacity": 512}, "'speckv' takes no prompt_capacity"),
        ("speckv-pc", {"sink_tokens": 2}, "'speckv-pc' takes no sink_tokens"),
    ],
)
def test_a_field_the_method_does_not_take_is_an_error_naming_the_ones_it_does(method, fields, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        config_for_method(method, **fields)
    assert "max_capacity_prompt" in str(caught.value)


def test_config_for_method_still_builds_each_method():
    assert config_for_method("streamingllm", max_capacity_prompt=64, sink_tokens=2) == StreamingLLMConfig(
        max_capacity_prompt=64, sink_tokens=2
    )
    cascade = config_for_method("SpecKV_PC", max_capacity_prompt=128, prompt_capacity=512, window_size=16)
    assert isinstance(cascade, SpecKVPCConfig)
    assert (cascade.speckv.max_capacity_prompt, cascade.speckv.window_size) == (128, 16)
    assert cascade.specpc.max_capacity_prompt == 512


@pytest.mark.parametrize("reduction", ["max", "mean"])
@pytest.mark.parametrize("kind", [SpecKVConfig, SnapKVConfig])
def test_one_scoring_answers_every_budget_as_a_standalone_run_would(
    kind, reduction, target, draft, tokenizer, long_text, monkeypatch
):
    text = long_text[:700]
    config = kind(max_capacity_prompt=BUDGETS[0], window_size=8, reduction_type=reduction)
    engine = SpecEngine(target, tokenizer, draft, config=config)
    cuts = _spy_cuts(monkeypatch)
    alone = [engine.with_config(config.with_budget(b)).generate(text, max_new_tokens=8) for b in BUDGETS]
    alone_cuts = list(cuts)
    cuts.clear()
    target_prefills, draft_prefills = _count_prefills(target), _count_prefills(draft)
    scored = engine.score(text, max_new_tokens=8)
    swept = [engine.generate_from(scored, budget=b, max_new_tokens=8) for b in BUDGETS]
    length = scored.length  # type: ignore[attr-defined]
    assert length > max(BUDGETS)
    n = 8 if kind is SpecKVConfig else 0
    assert target_prefills == [length + n]  # one scoring pass for three budgets
    assert draft_prefills == ([length] if n else [])
    layers = target.config.num_hidden_layers
    assert len(cuts) == len(alone_cuts) == len(BUDGETS) * layers
    for i, (b, a, s) in enumerate(zip(BUDGETS, alone, swept, strict=True)):
        cut_alone = torch.stack(alone_cuts[i * layers : (i + 1) * layers])  # [layers, kv_heads, C]
        cut_swept = torch.stack(cuts[i * layers : (i + 1) * layers])
        assert torch.equal(cut_alone, cut_swept), b
        assert cut_swept.shape[-1] == b
        assert s.token_ids == a.token_ids and len(a.token_ids) > 0, b
        for field in ("kv_cache_tokens", "lookahead_tokens", "prompt_tokens", "target_prefill_tokens"):
            assert getattr(s.stats, field) == getattr(a.stats, field), (b, field)
    assert not torch.equal(cuts[0][..., :8], cuts[layers][..., :8])  # the budgets keep different entries
    assert scored.cache.get_seq_length() == length + n  # type: ignore[attr-defined]  # never cut


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_one_draft_pass_serves_every_specpc_budget(reduction, target, draft, tokenizer, long_text):
    text = long_text[:900]
    config = SpecPCConfig(
        max_capacity_prompt=64, window_size=16, kernel_size=8, neighbor_tokens=8, reduction_type=reduction
    )
    engine = SpecEngine(target, tokenizer, draft, config=config)
    budgets = (64, 96, 160)
    alone = [engine.with_config(config.with_budget(b)).generate(text, max_new_tokens=8) for b in budgets]
    draft_prefills = _count_prefills(draft)
    scored = engine.score(text)
    swept = [engine.generate_from(scored, budget=b, max_new_tokens=8) for b in budgets]
    assert len(draft_prefills) == 1
    for b, a, s in zip(budgets, alone, swept, strict=True):
        assert s.stats.target_prefill_tokens == a.stats.target_prefill_tokens == b
        assert s.token_ids == a.token_ids and len(a.token_ids) > 0, b


def test_speckv_pc_sweeps_its_cache_budget_from_one_scoring(target, draft, tokenizer, long_text):
    pc = SpecPCConfig(max_capacity_prompt=96, window_size=16, kernel_size=8, neighbor_tokens=8)
    config = SpecKVPCConfig(specpc=pc, speckv=SpecKVConfig(max_capacity_prompt=24, window_size=8))
    engine = SpecEngine(target, tokenizer, draft, config=config)
    scored = engine.score(long_text[:900], max_new_tokens=6)
    for budget in (24, 48):
        alone = engine.with_config(config.with_budget(budget)).generate(long_text[:900], max_new_tokens=6)
        swept = engine.generate_from(scored, budget=budget, max_new_tokens=6)
        assert swept.token_ids == alone.token_ids
        assert swept.stats.kv_cache_tokens == alone.stats.kv_cache_tokens == budget


def test_full_and_streamingllm_answer_from_snapkvs_scoring(target, tokenizer, long_text):
    text = long_text[:700]
    snap = SpecEngine(target, tokenizer, config=SnapKVConfig(max_capacity_prompt=32, window_size=8))
    scored = snap.score(text, max_new_tokens=6)
    full = SpecEngine(target, tokenizer)
    stream = full.with_config(StreamingLLMConfig(max_capacity_prompt=32))
    assert (
        full.generate_from(scored, max_new_tokens=6).token_ids
        == full.generate(text, max_new_tokens=6).token_ids
    )
    assert (
        stream.generate_from(scored, max_new_tokens=6).token_ids
        == stream.generate(text, max_new_tokens=6).token_ids
    )


def test_answering_from_a_scoring_refuses_what_does_not_fit(target, draft, tokenizer, long_text):
    text = long_text[:700]
    snap = SpecEngine(target, tokenizer, config=SnapKVConfig(max_capacity_prompt=32, window_size=8))
    spec = SpecEngine(target, tokenizer, draft, config=SpecKVConfig(max_capacity_prompt=32, window_size=8))
    scored = snap.score(text, max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="'speckv' cannot answer from a 'snapkv' scoring"):
        spec.generate_from(scored, budget=32)
    with pytest.raises(InvalidInputError, match=r"budget 4 does not fit the snapkv settings.*window_size"):
        snap.generate_from(scored, budget=4)
    with pytest.raises(InvalidInputError, match="full inference keeps the whole prompt"):
        SpecEngine(target, tokenizer).generate_from(scored, budget=32)

"""What keeps a request's working memory low: the feed-forward of a long forward runs in token
chunks with the same results, StreamingLLM cuts each layer inside its prefill, and the
working-memory benchmark (benchmarks/working_memory.py) measures what these save."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import _tokenizer, tiny_model

import spec_rag.generation as generation
import spec_rag.methods.streamingllm as streaming_module
import spec_rag.scoring as scoring
from spec_rag import SpecEngine, SpecPC, SpecPCConfig, StreamingLLMConfig
from spec_rag.config import config_for_method
from spec_rag.errors import InvalidInputError
from spec_rag.generation import forward, new_cache
from spec_rag.scoring import HeadScoreRecorder, causal_tail_attention, enable_scoring
from spec_rag.testing import watch_layer_reads

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _gate_rows(model) -> list[int]:
    """Tokens each call of the first layer's ``gate_proj`` saw."""
    rows: list[int] = []
    gate = model.model.layers[0].mlp.gate_proj
    gate.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    return rows


def test_a_long_forward_runs_the_feed_forward_in_chunks_with_the_same_logits_and_cache(
    tokenizer, monkeypatch
):
    model = tiny_model("qwen2", tokenizer, seed=3, layers=2)
    ids = torch.randint(3, len(tokenizer), (1, 300))
    whole_cache = new_cache(model)
    whole = forward(model, ids, whole_cache, logits_to_keep=300)  # 300 <= 1024: one call per block
    rows = _gate_rows(model)
    assert rows == []
    monkeypatch.setattr(generation, "FFN_CHUNK_TOKENS", 64)
    chunked_cache = new_cache(model)
    chunked = forward(model, ids, chunked_cache, logits_to_keep=300)
    assert rows == [64, 64, 64, 64, 44]  # each block saw at most 64 tokens at a time
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5)
    assert (chunked.argmax(-1) == whole.argmax(-1)).all()
    for a, b in zip(chunked_cache.layers, whole_cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    rows.clear()
    with torch.inference_mode():
        model(input_ids=ids)  # a call of the model itself is not chunked
    assert rows == [300]


def test_streamingllm_cuts_each_layer_inside_its_prefill(tokenizer, long_text, monkeypatch):
    model = tiny_model("qwen2", tokenizer, seed=1, layers=3)
    engine = SpecEngine(model, tokenizer, config=StreamingLLMConfig(max_capacity_prompt=32))
    seen: list[list[int]] = []  # per cut: every layer's cache length at that moment
    original = streaming_module.StreamingLLM.cut_layer

    def spy(self, cache, length, budget, layer, scores, **kwargs):
        written = cache.layers[: layer + 1]  # the later layers have not run yet
        seen.append([int(entry.keys.shape[2]) for entry in written])
        original(self, cache, length, budget, layer, scores, **kwargs)

    monkeypatch.setattr(streaming_module.StreamingLLM, "cut_layer", spy)
    text = long_text[:700]
    answer = engine.generate(text, max_new_tokens=6)
    length = answer.stats.prompt_tokens
    assert length > 32
    assert len(seen) == 3
    for layer, lengths in enumerate(seen):
        assert lengths[:layer] == [32] * layer  # the layers before were already cut
        assert lengths[layer] == length  # this one holds the whole prompt until its cut
    assert answer.stats.kv_cache_tokens == 32
    # The same answer as cutting one whole-prompt cache afterwards (a scoring for every budget).
    scored = SpecEngine(model, tokenizer).score(text, max_new_tokens=6)
    assert engine.generate_from(scored, max_new_tokens=6).token_ids == answer.token_ids


def test_working_memory_benchmark_reports_a_prompt_cut_below_full(tmp_path, monkeypatch, capsys):
    tokenizer = _tokenizer(512)
    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    # A wide feed-forward makes the target's prefill activations dominate its working memory.
    target = tiny_model("qwen2", tokenizer, seed=1, layers=2, intermediate_size=8192)
    draft = tiny_model("qwen2", tokenizer, seed=2, layers=2)
    for model, directory in ((target, target_dir), (draft, draft_dir)):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("working_memory")
    argv = ["--target", str(target_dir), "--draft", str(draft_dir), "--dtype", "float32", "--lengths", "1600"]
    argv += ["--methods", "full", "specpc", "--prompt-budget", "256", "--max-new-tokens", "2"]
    argv += ["--json", str(tmp_path / "rows.jsonl")]
    monkeypatch.setattr(sys, "argv", ["working_memory.py", *argv])
    module.main()
    out = capsys.readouterr().out
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    rows = {r["method"]: r for r in map(json.loads, lines)}
    full, specpc = rows["full"], rows["specpc"]
    assert full["draft_weights"] == 0  # full loads no draft
    assert full["target_weights"] == specpc["target_weights"] == module.weight_bytes(target)
    assert specpc["draft_weights"] == module.weight_bytes(draft)
    for row in (full, specpc):
        assert row["working"] > 0 and row["peak_rss"] == row["base_rss"] + row["working"]
        assert row["base_rss"] > row["target_weights"] + row["draft_weights"]
    assert specpc["target_prefill_tokens"] <= 256 < full["target_prefill_tokens"]
    # The engine's split of each row's seconds: full runs no draft; no part exceeds the whole.
    assert full["draft_s"] == 0 < specpc["draft_s"]
    for row in (full, specpc):
        split = row["draft_s"] + row["target_prefill_s"] + row["decode_s"]
        assert row["target_prefill_s"] > 0 and split <= row["seconds"] + 1e-3
        assert row["output_tokens"] >= 1 and row["cpu_s"] > 0
    # Full's prefill holds [1024, 8192] float32 feed-forward activations (32 MiB each); SpecPC's
    # target sees 256 tokens and its draft is narrow.
    assert full["working"] > 48 * 2**20
    assert specpc["working"] < 0.6 * full["working"]
    assert "| full | 1600 |" in out and "| 1.00 |" in out and "| specpc | 1600 |" in out


# -- chunked prefill -------------------------------------------------------------------------------
def test_prefill_chunks_cover_the_pass_and_keep_the_recorders_queries_in_the_last_chunk():
    assert generation.prefill_chunks(300, None) == [(0, 300)]
    assert generation.prefill_chunks(300, 300) == [(0, 300)]
    assert generation.prefill_chunks(300, 64) == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]
    # The last chunk holds the kept logits' rows ...
    assert generation.prefill_chunks(300, 64, tail=50) == [
        (0, 64),
        (64, 128),
        (128, 192),
        (192, 250),
        (250, 300),
    ]
    # ... and every query a recorder scores (absolute positions: the pass starts at 1000).
    recorder = HeadScoreRecorder(1000 + 200, 1000 + 290)
    assert generation.prefill_chunks(300, 64, recorder=recorder, offset=1000)[-2:] == [(192, 200), (200, 300)]
    # A recorder that cuts each layer as it is scored gets the same chunks (run layer by layer).
    recorder.on_layer = lambda layer, scores: None
    assert generation.prefill_chunks(300, 64, recorder=recorder, offset=1000)[-2:] == [(192, 200), (200, 300)]
    with pytest.raises(ValueError, match="prefill_chunk_size must be positive"):
        generation.prefill_chunks(300, 0)


def test_a_chunked_prefill_gives_the_same_logits_and_cache_as_one_pass(tokenizer):
    model = tiny_model("qwen2", tokenizer, seed=3, layers=2)
    ids = torch.randint(3, len(tokenizer), (1, 300))
    whole_cache, chunked_cache = new_cache(model), new_cache(model)
    whole = forward(model, ids, whole_cache, logits_to_keep=5)
    calls = watch_layer_reads(model)[0]
    chunked = forward(model, ids, chunked_cache, logits_to_keep=5, prefill_chunk_size=64)
    assert calls == [64, 64, 64, 64, 44]
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5)
    assert (chunked.argmax(-1) == whole.argmax(-1)).all()
    for a, b in zip(chunked_cache.layers, whole_cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    # On top of a cache, with explicit RoPE positions (the chunks continue them).
    calls.clear()
    more = torch.randint(3, len(tokenizer), (1, 150))
    whole_next = forward(model, more, whole_cache, position_start=400)
    calls.clear()
    chunked_next = forward(model, more, chunked_cache, position_start=400, prefill_chunk_size=64)
    assert calls == [64, 64, 22]
    assert torch.allclose(chunked_next, whole_next, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [4, 1])  # multi-head and grouped-query attention
def test_causal_tail_attention_equals_sdpa_under_the_caches_causal_mask(dtype, tolerance, kv_heads):
    torch.manual_seed(0)
    new, total = 37, 150
    query = torch.randn(1, 4, new, 16, dtype=dtype)
    key, value = (
        torch.randn(1, kv_heads, total, 16, dtype=dtype),
        torch.randn(1, kv_heads, total, 16, dtype=dtype),
    )
    mask = torch.ones(new, total, dtype=torch.bool).tril(total - new)  # row i sees keys up to past + i
    groups = 4 // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(),
        key.float().repeat_interleave(groups, 1),
        value.float().repeat_interleave(groups, 1),
        attn_mask=mask,
        scale=0.3,
    ).transpose(1, 2)
    got = causal_tail_attention(torch.nn.Identity(), query, key, value, scaling=0.3, dropout=0.0)
    assert got is not None and got.dtype == dtype and got.shape == (1, new, 4, 16)
    assert torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance)
    # Not its case: one new token, no earlier keys, dropout; the caller then runs the base kernel.
    assert causal_tail_attention(torch.nn.Identity(), query[:, :, :1], key, value) is None
    assert causal_tail_attention(torch.nn.Identity(), query, key[:, :, :new], value[:, :, :new]) is None
    assert causal_tail_attention(torch.nn.Identity(), query, key, value, dropout=0.1) is None


def test_a_wrapped_model_reads_chunks_through_the_causal_tail_path_with_one_pass_logits(
    tokenizer, monkeypatch
):
    model = tiny_model("qwen2", tokenizer, seed=3, layers=2)
    ids = torch.randint(3, len(tokenizer), (1, 300))
    whole_cache, chunked_cache = new_cache(model), new_cache(model)
    whole = forward(model, ids, whole_cache, logits_to_keep=5)
    enable_scoring(model)
    taken: list[int] = []
    path = scoring.causal_tail_attention

    def spy(module, query, key, value, **kwargs):
        output = path(module, query, key, value, **kwargs)
        taken.append(output is not None)
        return output

    monkeypatch.setattr(scoring, "causal_tail_attention", spy)
    chunked = forward(model, ids, chunked_cache, logits_to_keep=5, prefill_chunk_size=64)
    assert taken == [False] * 2 + [True] * 8  # 2 layers: the first chunk is plain causal, 4 more on a cache
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked_cache.layers, whole_cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
def test_a_prefill_that_cuts_each_layer_runs_layer_by_layer_with_one_pass_results(tokenizer, arch):
    model = tiny_model(arch, tokenizer, seed=3, layers=3)
    enable_scoring(model)
    ids = torch.randint(3, len(tokenizer), (1, 300))
    runs = []
    for chunk in (None, 64):
        cache, scores, whole_layers = new_cache(model), {}, []

        def cut(layer, layer_scores, cache=cache, scores=scores, whole_layers=whole_layers):
            # every layer's cache length when this one is cut: the later ones have not run yet
            whole_layers.append([int(entry.keys.shape[2]) for entry in cache.layers[: layer + 1]])
            scores[layer] = layer_scores.clone()
            keep = layer_scores.amax(0).topk(50).indices.sort().values
            generation.keep_layer_positions(cache.layers[layer], keep)

        calls, hook = watch_layer_reads(model)
        recorder = HeadScoreRecorder(260, 290, on_layer=cut)  # window 260..289, lookahead 290..299
        logits = forward(model, ids, cache, recorder=recorder, logits_to_keep=11, prefill_chunk_size=chunk)
        hook.remove()
        runs.append((logits, cache, scores, whole_layers, calls))
    (logits, cache, scores, cuts, calls), (logits_c, cache_c, scores_c, cuts_c, calls_c) = runs
    assert calls == [300] and calls_c == [64, 64, 64, 64, 44]  # the last chunk holds the window (260..)
    assert cuts_c == cuts == [[300], [50, 300], [50, 50, 300]]  # one layer whole at a time
    assert torch.allclose(logits_c, logits, atol=1e-5, rtol=1e-5)
    for layer in range(3):
        assert torch.allclose(scores_c[layer], scores[layer], atol=1e-5)
    for a, b in zip(cache_c.layers, cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def test_a_cutting_prefill_without_the_causal_path_runs_as_one_pass(tokenizer):
    model = tiny_model("qwen2", tokenizer, seed=3, layers=2, attn_implementation="eager")
    enable_scoring(model)  # the wrapper over eager: chunks would need masks
    assert generation.layer_stack(model) is None
    calls = watch_layer_reads(model)[0]
    recorder = HeadScoreRecorder(260, 300, on_layer=lambda layer, scores: None)
    forward(
        model,
        torch.randint(3, len(tokenizer), (1, 300)),
        new_cache(model),
        recorder=recorder,
        prefill_chunk_size=64,
    )
    assert calls == [300]


def test_draft_scores_from_a_chunked_prefill_equal_one_pass(tokenizer, long_text):
    draft = tiny_model("qwen2", tokenizer, seed=2, layers=3)
    ids = torch.tensor(tokenizer(long_text[:3000])["input_ids"])
    assert ids.numel() > 400
    config = SpecPCConfig(window_size=48, lookahead_tokens=4, starting_layer_index=0)
    whole = SpecPC(draft, tokenizer, config, prefill_chunk_size=None)
    chunked = SpecPC(draft, tokenizer, config, prefill_chunk_size=100)  # the window spans two chunks
    calls = watch_layer_reads(draft)[0]
    scores_whole, lookahead_whole = whole.score_tokens(ids)
    assert calls[0] == ids.numel()
    calls.clear()
    scores_chunked, lookahead_chunked = chunked.score_tokens(ids)
    prefill = calls[: ids.numel() // 100 + 1]
    assert max(prefill) <= 100 and sum(prefill) == ids.numel()
    assert lookahead_chunked == lookahead_whole
    assert torch.allclose(scores_chunked, scores_whole, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "snapkv", "streamingllm", "specpc", "speckv", "speckv-pc"])
def test_engine_answers_alike_with_and_without_chunked_prefill(tokenizer, long_text, method):
    target = tiny_model("qwen2", tokenizer, seed=1, layers=2)
    draft = tiny_model("qwen2", tokenizer, seed=2, layers=2)
    budgets = {"max_capacity_prompt": 96} if method not in ("full", "speckv-pc") else {}
    if method == "speckv-pc":
        budgets = {"max_capacity_prompt": 64, "prompt_capacity": 160}
    config = None if method == "full" else config_for_method(method, **budgets)
    text = long_text[:2500]
    whole = SpecEngine(target, tokenizer, draft, config=config, prefill_chunk_size=None)
    chunked = SpecEngine(target, tokenizer, draft, config=config, prefill_chunk_size=128)
    calls, draft_calls = watch_layer_reads(target)[0], watch_layer_reads(draft)[0]
    expected = whole.generate(text, max_new_tokens=8)
    whole_calls, whole_draft_calls = list(calls), list(draft_calls)
    calls.clear()
    draft_calls.clear()
    answer = chunked.generate(text, max_new_tokens=8)
    assert answer.token_ids == expected.token_ids
    assert answer.stats.kv_cache_tokens == expected.stats.kv_cache_tokens
    prompt, prefill = answer.stats.prompt_tokens, answer.stats.target_prefill_tokens
    if method in ("full", "snapkv", "streamingllm", "speckv"):  # the whole prompt: in chunks, chunk by chunk
        # (full), or layer by layer where each layer's cache is cut inside the pass; the last
        # chunk also holds the window and lookahead queries
        assert max(calls) <= 128 + 64 < prefill <= max(whole_calls)
    else:  # the cut prompt (and SpecKV-PC's lookahead after it) fits about one chunk
        assert max(calls) <= 128 and prefill <= 160
    if method not in ("full", "snapkv", "streamingllm"):  # the draft reads the whole prompt, in chunks
        assert max(draft_calls) <= 128 < prompt <= max(whole_draft_calls)


def test_prefill_chunk_size_must_be_positive(tokenizer):
    target = tiny_model("qwen2", tokenizer, seed=1, layers=1)
    with pytest.raises(InvalidInputError, match="prefill_chunk_size must be positive"):
        SpecEngine(target, tokenizer, prefill_chunk_size=0)

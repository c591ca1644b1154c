"""The CUDA path: every method on a GPU answers as on the CPU, keeps its tensors on the device,
stays within its budget in bfloat16, measures its peak memory from the CUDA allocator, and one
engine serves several threads at once. Skipped where torch sees no CUDA device.

``SPEC_RAG_TEST_DEVICE=cpu`` runs the same checks on the CPU (a check of the tests themselves)."""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
from tiny_models import tiny_model

from spec_rag import (
    SnapKVConfig,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPC,
    SpecPCConfig,
    StreamingLLMConfig,
)
from spec_rag.profiling import PeakMemory

DEVICE = os.environ.get("SPEC_RAG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

PC = SpecPCConfig(max_capacity_prompt=96, window_size=16, kernel_size=8, neighbor_tokens=8)
KV = SpecKVConfig(max_capacity_prompt=40, window_size=8)
CONFIGS = {
    "full": None,
    "speckv": KV,
    "specpc": PC,
    "speckv-pc": SpecKVPCConfig(specpc=PC, speckv=KV),
    "snapkv": SnapKVConfig(max_capacity_prompt=40, window_size=8),
    "streamingllm": StreamingLLMConfig(max_capacity_prompt=40),
}


@pytest.fixture(scope="module")
def cuda_pair(target, draft):
    return copy.deepcopy(target).to(DEVICE), copy.deepcopy(draft).to(DEVICE)


@pytest.fixture(scope="module")
def bf16_pair(target, draft):
    return (
        copy.deepcopy(target).to(DEVICE, torch.bfloat16),
        copy.deepcopy(draft).to(DEVICE, torch.bfloat16),
    )


@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_method_answers_on_cuda_as_on_the_cpu(method, target, draft, cuda_pair, tokenizer, long_text):
    text = long_text[:1500]
    on_cpu = SpecEngine(target, tokenizer, draft, config=CONFIGS[method]).generate(text, max_new_tokens=12)
    on_gpu = SpecEngine(cuda_pair[0], tokenizer, cuda_pair[1], config=CONFIGS[method]).generate(
        text, max_new_tokens=12
    )
    assert on_gpu.token_ids == on_cpu.token_ids and len(on_cpu.token_ids) == 12
    for field in ("prompt_tokens", "target_prefill_tokens", "kv_cache_tokens", "lookahead_tokens"):
        assert getattr(on_gpu.stats, field) == getattr(on_cpu.stats, field), field


def test_draft_scores_on_cuda_match_the_cpus(draft, cuda_pair, tokenizer, long_text):
    text = long_text[:1500]
    on_cpu = SpecPC(draft, tokenizer, PC).compress(text)
    on_gpu = SpecPC(cuda_pair[1], tokenizer, PC).compress(text)
    torch.testing.assert_close(on_gpu.scores.cpu(), on_cpu.scores, rtol=1e-4, atol=1e-6)
    assert on_gpu.text == on_cpu.text


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bfloat16_requests_stay_on_the_gpu_within_their_budget(method, bf16_pair, tokenizer, long_text):
    target, draft = bf16_pair
    engine = SpecEngine(target, tokenizer, draft, config=CONFIGS[method])
    scored = engine.score(long_text[:1500], max_new_tokens=8)
    cache = getattr(scored, "cache", None)
    if cache is not None:
        keys = cache.layers[0].keys
        assert keys.device.type == torch.device(DEVICE).type and keys.dtype == torch.bfloat16
    with PeakMemory(DEVICE) as peak:
        out = engine.generate(long_text[:1500], max_new_tokens=8)
    assert peak.peak > 0  # the CUDA allocator's peak, read around the request
    assert len(out.token_ids) == 8
    expected_cache = {"full": out.stats.prompt_tokens, "specpc": out.stats.target_prefill_tokens}
    assert out.stats.kv_cache_tokens == expected_cache.get(method, 40)
    if method in ("specpc", "speckv-pc"):
        assert out.stats.target_prefill_tokens <= 96 + (8 if method == "speckv-pc" else 0)


def test_a_cuda_engine_serves_four_threads_at_once(cuda_pair, tokenizer, long_text):
    engine = SpecEngine(cuda_pair[0], tokenizer, cuda_pair[1], config=CONFIGS["speckv-pc"])
    prompts = [long_text[i * 300 : i * 300 + 1200] for i in range(4)]
    alone = [engine.generate(p, max_new_tokens=10).token_ids for p in prompts]
    results: list[list[int] | None] = [None] * 4
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        start.wait()
        results[i] = engine.generate(prompts[i], max_new_tokens=10).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_a_prompt_past_the_drafts_window_is_scored_in_chunks_on_cuda(target, tokenizer, long_text):
    short = tiny_model("qwen2", tokenizer, seed=2, layers=2, max_position_embeddings=256)
    engine_cpu = SpecEngine(target, tokenizer, short, config=PC)
    engine_gpu = SpecEngine(
        copy.deepcopy(target).to(DEVICE), tokenizer, copy.deepcopy(short).to(DEVICE), config=PC
    )
    on_gpu = engine_gpu.score(long_text[:3000])
    on_cpu = engine_cpu.score(long_text[:3000])
    assert on_gpu.chunks == on_cpu.chunks > 1
    torch.testing.assert_close(on_gpu.scores.cpu(), on_cpu.scores, rtol=1e-4, atol=1e-6)

"""SpecPC / SpecKV selection invariants (property-based)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spec_rag.config import SpecPCConfig
from spec_rag.scoring import pool_scores
from spec_rag.selection import (
    neighbor_offsets,
    select_kv_positions,
    select_prompt_tokens,
    streaming_positions,
)
from spec_rag.specpc import select_tokens


@st.composite
def prompt_case(draw):
    length = draw(st.integers(1, 300))
    window = draw(st.integers(0, 40))
    capacity = draw(st.integers(max(window, 1), 400))
    neighbors = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**16))
    scores = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    return scores, capacity, window, neighbors


@settings(max_examples=200, deadline=None)
@given(prompt_case())
def test_specpc_keeps_min_of_budget_and_length_unique_sorted_with_window(case):
    scores, capacity, window, neighbors = case
    kept = select_prompt_tokens(scores, capacity, window_size=window, neighbor_tokens=neighbors)
    length = scores.numel()
    assert kept.numel() == min(capacity, length)
    assert torch.equal(kept, kept.unique())  # unique and sorted
    assert int(kept.min()) >= 0 and int(kept.max()) < length
    last = set(range(max(length - min(window, capacity), 0), length))
    assert last <= set(kept.tolist())


def test_neighbors_of_the_top_token_come_before_lower_ranked_tokens():
    scores = torch.zeros(100)
    scores[50] = 1.0  # the best token
    scores[10] = 0.5  # the runner-up
    kept = select_prompt_tokens(scores, 5, window_size=0, neighbor_tokens=5)
    # Budget 5 is filled by the best token and its 4 nearest neighbours, not by the runner-up.
    assert kept.tolist() == [48, 49, 50, 51, 52]


def test_capacity_above_prompt_length_keeps_every_token():
    kept = select_prompt_tokens(torch.rand(30), 100, window_size=8)
    assert kept.tolist() == list(range(30))


def test_always_keep_positions_survive_a_small_budget():
    scores = torch.rand(60)
    always = torch.zeros(60, dtype=torch.bool)
    always[[0, 7]] = True
    kept = select_prompt_tokens(scores, 10, window_size=4, always_keep=always)
    assert {0, 7, 56, 57, 58, 59} <= set(kept.tolist())


def test_neighbor_offsets_are_centred_and_nearest_first():
    assert neighbor_offsets(4).tolist() == [0, -1, 1, -2]
    assert sorted(neighbor_offsets(7).tolist()) == list(range(-3, 4))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 200), st.integers(0, 16), st.integers(1, 250), st.sampled_from([1, 3, 7]))
def test_speckv_keeps_exactly_capacity_per_head_including_the_window(length, window, capacity, kernel):
    window = min(window, capacity)
    if capacity >= length:
        return  # the engine does not compress then
    scores = torch.rand(2, length)
    kept = select_kv_positions(
        scores, length, capacity, window_size=window, kernel_size=kernel, pool_type="max"
    )
    assert kept.shape == (2, capacity)
    for head in kept:
        assert torch.equal(head, head.unique())
        assert set(range(length - window, length)) <= set(head.tolist())


def test_speckv_heads_choose_their_own_positions():
    scores = torch.zeros(2, 20)
    scores[0, 3] = 1.0
    scores[1, 11] = 1.0
    kept = select_kv_positions(scores, 20, 3, window_size=2, kernel_size=1, pool_type="max")
    assert kept.tolist() == [[3, 18, 19], [11, 18, 19]]


def test_speckv_breaks_equal_scores_by_position_so_every_device_keeps_the_same_entries():
    # max-pooling turns one peak into a run of equal scores; topk's order among equal values
    # is unspecified and differs between the CPU and CUDA kernels
    scores = torch.zeros(2, 1000)
    scores[:, 500] = 1.0
    kept = select_kv_positions(scores, 1000, 14, window_size=2, kernel_size=7, pool_type="max")
    assert kept.tolist() == [[*range(5), *range(497, 504), 998, 999]] * 2  # the run, then the earliest
    protected = torch.zeros(1000, dtype=torch.bool)
    protected[10] = True
    kept = select_kv_positions(
        scores, 1000, 14, window_size=2, kernel_size=7, pool_type="max", protected=protected
    )
    assert kept.tolist() == [[*range(4), 10, *range(497, 504), 998, 999]] * 2


def test_streaming_keeps_sinks_and_recent_tokens():
    assert streaming_positions(20, 6, 4).tolist() == [0, 1, 2, 3, 18, 19]


def test_max_pool_spreads_a_peak_to_its_neighbours_and_keeps_length():
    x = torch.zeros(10)
    x[5] = 1.0
    assert pool_scores(x, 3, "max").tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert pool_scores(x, 4, "max").shape == (10,)


def test_avg_pool_does_not_pull_edges_down_with_padding():
    x = torch.ones(6)
    assert torch.allclose(pool_scores(x, 5, "avg"), torch.ones(6))


def test_segments_keep_neighbours_inside_their_own_document():
    scores = torch.zeros(20)
    scores[10] = 1.0  # first token of the second document
    segments = torch.tensor([0] * 10 + [1] * 10)
    kept = select_prompt_tokens(scores, 3, window_size=0, neighbor_tokens=5, segments=segments)
    assert kept.tolist() == [10, 11, 12]  # not 9, from the document before
    unsegmented = select_prompt_tokens(scores, 3, window_size=0, neighbor_tokens=5)
    assert unsegmented.tolist() == [9, 10, 11]


def test_specpc_config_decides_whether_special_tokens_are_kept():
    scores = torch.zeros(40)
    scores[10] = 1.0  # the only scored token
    special = torch.zeros(40, dtype=torch.bool)
    special[[0, 20]] = True
    cfg = SpecPCConfig(max_capacity_prompt=8, window_size=4, neighbor_tokens=1)
    kept = select_tokens(scores, 7, cfg, special).tolist()
    assert kept == [0, 10, 20, 36, 37, 38, 39]
    off = cfg.model_copy(update={"keep_special_tokens": False})
    assert select_tokens(scores, 5, off, special).tolist() == [10, 36, 37, 38, 39]
    assert select_tokens(scores, 5, cfg, special).tolist() == [0, 36, 37, 38, 39]  # specials first


def test_method_info_declares_which_methods_need_a_draft() -> None:
    from spec_rag import METHODS, method_info

    needs = {name for name in METHODS if method_info(name).needs_draft}
    assert needs == {"specpc", "speckv", "speckv-pc"}
    assert method_info("SpecKV_PC").compresses_prompt and method_info("SpecKV_PC").compresses_cache
    assert not method_info("snapkv").uses_lookahead
    with pytest.raises(ValueError, match="unknown method 'specv'"):
        method_info("specv")

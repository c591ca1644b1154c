"""Which prompt tokens (SpecPC) and which KV entries (SpecKV, SnapKV, StreamingLLM) to keep."""

from __future__ import annotations

import torch

from spec_rag.errors import InvalidInputError
from spec_rag.scoring import pool_scores


def neighbor_offsets(neighbor_tokens: int) -> torch.Tensor:
    """Offsets of the ``neighbor_tokens`` positions centred on a token, nearest first.

    ``neighbor_offsets(4) == [0, -1, 1, -2]``: the span ``[-2, 1]`` ordered by distance.
    """
    low = -(neighbor_tokens // 2)
    span = torch.arange(low, low + neighbor_tokens)
    order = torch.argsort(span.abs() * 2 + (span > 0).long(), stable=True)  # ties: left first
    return span[order]


def _first_occurrences(candidates: torch.Tensor) -> torch.Tensor:
    """Unique values of ``candidates`` in the order they first appear."""
    if candidates.numel() == 0:
        return candidates
    unique, inverse = torch.unique(candidates, return_inverse=True)
    first = torch.full((unique.numel(),), candidates.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(candidates.numel()), reduce="amin")
    return unique[torch.argsort(first)]


def select_prompt_tokens(
    scores: torch.Tensor,
    capacity: int,
    *,
    window_size: int,
    neighbor_tokens: int = 1,
    always_keep: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """SpecPC selection: the sorted positions of the ``min(capacity, L)`` tokens kept.

    Priority order: the last ``window_size`` tokens, then ``always_keep`` positions (a bool
    mask), then tokens by descending score, each expanded to its ``neighbor_tokens`` nearest
    positions. ``candidates`` (bool mask) restricts which tokens may be ranked. ``segments``
    (``[L]`` ids, e.g. each token's document) keeps a token's neighbours inside its own segment.

    Args:
        scores: ``[L]`` one importance score per prompt token (already smoothed).
    """
    length = scores.numel()
    if capacity >= length:
        return torch.arange(length)
    forced = [torch.arange(max(length - window_size, 0), length).flip(0)]
    if always_keep is not None:
        forced.append(torch.nonzero(always_keep, as_tuple=False).flatten())
    ranked_scores = scores.float().clone()
    if candidates is not None:
        ranked_scores[~candidates] = float("-inf")
    ranked = torch.argsort(ranked_scores, descending=True, stable=True)
    if candidates is not None:
        ranked = ranked[: int(candidates.sum())]
    expanded = ranked[:, None] + neighbor_offsets(neighbor_tokens)[None, :]  # [ranked, neighbours]
    inside = (expanded >= 0) & (expanded < length)
    if segments is not None:
        inside &= segments[expanded.clamp(0, length - 1)] == segments[ranked][:, None]
    expanded = expanded[inside]  # boolean indexing keeps the rank-major order
    kept = _first_occurrences(torch.cat([*forced, expanded]))[:capacity]
    return kept.sort().values


def forced_positions(
    prompt_length: int, *, first: int = 0, last: int = 0, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """``[F]`` sorted positions a KV selection keeps whatever the scores: the ``first`` positions
    (attention sinks), the ``last`` ones (the window) and the ``protected`` ones (``[L]`` bool)."""
    forced = torch.zeros(prompt_length, dtype=torch.bool)
    forced[: min(first, prompt_length)] = True
    forced[prompt_length - min(last, prompt_length) :] = True
    if protected is not None:
        forced |= protected.to(device="cpu", dtype=torch.bool)[:prompt_length]
    return torch.nonzero(forced, as_tuple=False).flatten()


def check_kv_capacity(
    capacity: int, forced: int, protected: torch.Tensor | None, *, kept: str, method: str = "KV cache"
) -> None:
    """A clear error when ``capacity`` cannot hold the ``forced`` positions never evicted: a tool
    prompt's template structure (``protected``, ``[L]`` bool) and ``kept`` (e.g. the window)."""
    if forced <= capacity:
        return
    structure = int(protected.sum()) if protected is not None else 0
    raise InvalidInputError(
        f"the {method} budget ({capacity}) cannot hold the KV entries it never evicts: the tool prompt's "
        f"template structure ({structure} tokens: tool definitions, earlier calls, call and result "
        f"tags) and {kept}, {forced} positions in all. Raise max_capacity_prompt to {forced} or more."
    )


def _top_positions(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """``[kv_heads, k]`` positions of each row's ``k`` highest scores. Max-pooling leaves runs of
    equal scores, and ``topk`` breaks such ties differently on each device; a stable sort gives
    the earlier position, so the CPU and a GPU keep the same entries."""
    return torch.argsort(pooled, dim=-1, descending=True, stable=True)[:, :k]


def select_kv_positions(
    head_scores: torch.Tensor,
    prompt_length: int,
    capacity: int,
    *,
    window_size: int,
    kernel_size: int,
    pool_type: str,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """SpecKV / SnapKV selection for one layer.

    Args:
        head_scores: ``[kv_heads, L]`` scores of the prompt positions.
        protected: ``[L]`` bool, positions every head keeps (a tool prompt's template structure),
            counted in ``capacity``; ``None``: none.

    Returns:
        ``[kv_heads, C]`` sorted positions: per head the last ``w`` positions, the protected
        ones, and the top-scored of the rest of ``x[:-w]`` (by pooled score) filling ``C``.

    Raises:
        InvalidInputError: the window and the protected positions alone exceed ``capacity``.
    """
    if protected is not None:
        return _select_kv_protected(
            head_scores, prompt_length, capacity, window_size, kernel_size, pool_type, protected
        )
    kv_heads = head_scores.shape[0]
    window_size = min(window_size, prompt_length)
    recent = torch.arange(prompt_length - window_size, prompt_length, device=head_scores.device)
    recent = recent.expand(kv_heads, -1)  # [kv_heads, w]
    budget = capacity - window_size
    if budget <= 0:
        return recent[:, -capacity:] if capacity > 0 else recent[:, :0]
    pooled = pool_scores(head_scores[:, : prompt_length - window_size], kernel_size, pool_type)  # [kv, L-w]
    top = _top_positions(pooled, min(budget, pooled.shape[-1]))  # [kv_heads, C-w]
    return torch.cat([top.sort(dim=-1).values, recent], dim=-1)  # [kv_heads, C]


def _select_kv_protected(
    head_scores: torch.Tensor,
    prompt_length: int,
    capacity: int,
    window_size: int,
    kernel_size: int,
    pool_type: str,
    protected: torch.Tensor,
) -> torch.Tensor:
    """:func:`select_kv_positions` with ``protected`` (``[L]`` bool) positions kept by every head."""
    kv_heads = head_scores.shape[0]
    window_size = min(window_size, prompt_length)
    forced = forced_positions(prompt_length, last=window_size, protected=protected)  # [F]
    kept = f"the last {window_size} positions (window_size)"
    check_kv_capacity(capacity, forced.numel(), protected, kept=kept)
    forced = forced.to(head_scores.device)
    prefix = prompt_length - window_size
    pooled = pool_scores(head_scores[:, :prefix], kernel_size, pool_type)  # [kv, L-w]
    taken = torch.zeros(prefix, dtype=torch.bool, device=head_scores.device)
    taken[forced[forced < prefix]] = True
    pooled = pooled.masked_fill(taken, float("-inf"))  # only the positions not forced compete
    top = _top_positions(pooled, min(capacity - forced.numel(), prefix - int(taken.sum())))  # [kv, C-F]
    return torch.cat([top, forced.expand(kv_heads, -1)], dim=-1).sort(dim=-1).values  # [kv_heads, C]


def streaming_positions(
    prompt_length: int, capacity: int, sink_tokens: int, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """StreamingLLM: the first ``sink_tokens`` positions plus the most recent ones, ``[C]``;
    ``protected`` (``[L]`` bool, a tool prompt's template structure) positions are kept too,
    counted in ``capacity``, and the most recent others fill what is left.

    Raises:
        InvalidInputError: the sinks and the protected positions alone exceed ``capacity``.
    """
    if protected is None:
        sinks = torch.arange(min(sink_tokens, capacity))
        recent = torch.arange(prompt_length - (capacity - sinks.numel()), prompt_length)
        return torch.cat([sinks, recent])
    sink_tokens = min(sink_tokens, prompt_length)
    forced = forced_positions(prompt_length, first=sink_tokens, protected=protected)  # [F]
    kept = f"the first {sink_tokens} positions (sink_tokens)"
    check_kv_capacity(capacity, forced.numel(), protected, kept=kept)
    free = torch.ones(prompt_length, dtype=torch.bool)
    free[forced] = False
    rest = torch.nonzero(free, as_tuple=False).flatten()
    recent = rest[max(rest.numel() - (capacity - forced.numel()), 0) :]
    return torch.cat([forced, recent]).sort().values

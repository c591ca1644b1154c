"""Window attention scores, computed beside a model's own attention.

The model keeps its attention kernel (sdpa, eager or flash-attention) for the layer output.
A thin wrapper registered in transformers' ``AttentionInterface`` under a new name
(``spec_rag_<base>``) sees each layer's post-RoPE query and key states and, only when the
caller passed a recorder through the forward's keyword arguments, computes the causal
attention probabilities of a few *window* queries over the keys: ``|Q| x L`` per head, never
``L x L``. Nothing process-global is replaced, and a forward without a recorder runs exactly
the base kernel, so one model can serve scoring and plain calls from several threads at once.

The wrapper also runs one case faster than the base kernel: on CPU, a pass of several new tokens
over a cache that already holds earlier ones (a chunk of a chunked prefill). Its mask (causal,
aligned to the cache's end) sends sdpa to a masked kernel that computes every masked-out score
of the new block too; the wrapper instead attends to the earlier keys unmasked and to the new
block causally, two flash-attention calls merged through their log-sum-exps (the same output up
to rounding, no repeated KV heads, no mask).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from spec_rag.errors import UnsupportedModelError

RECORDER_KWARG = "spec_rag_recorder"
#: Passed by :func:`spec_rag.generation.forward` to models with the wrapper: the pass's mask is
#: causal and aligned to the cache's end (one sequence, no padding), as every spec-rag forward's is.
CAUSAL_KWARG = "spec_rag_causal"
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_PREFIX = "spec_rag_"
_register_lock = threading.Lock()


def _wrapped_attention(base: str) -> Callable[..., Any]:
    base_fn = eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        recorder: WindowRecorder | None = kwargs.pop(RECORDER_KWARG, None)
        causal = kwargs.pop(CAUSAL_KWARG, False)
        if recorder is not None:
            recorder.observe(module, query, key, kwargs)
        if causal and base == "sdpa":
            output = causal_tail_attention(module, query, key, value, **kwargs)
            if output is not None:
                return output, None
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def causal_tail_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any
) -> torch.Tensor | None:
    """Attention of ``q`` new tokens whose keys are the last ``q`` of ``key`` (``[b, heads, L, d]``),
    causal among themselves and over every earlier key; ``[b, q, heads, d]`` as sdpa returns it.

    ``None`` where this path does not apply (not on CPU, no earlier keys, a single token, dropout,
    soft-capping, a sliding window, or a torch without the CPU flash kernel): the caller then
    runs the base kernel.
    """
    new, past = query.shape[2], key.shape[2] - query.shape[2]
    if _FLASH_CPU is None or query.device.type != "cpu" or new <= 1 or past <= 0:
        return None
    if kwargs.get("dropout") or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        return None
    if query.dtype not in (torch.float32, torch.bfloat16) or query.shape[1] % key.shape[1]:
        return None
    scale = kwargs.get("scaling")
    earlier, earlier_lse = _FLASH_CPU(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scale)
    own, own_lse = _FLASH_CPU(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scale)
    weight = torch.sigmoid(earlier_lse.float() - own_lse.float()).unsqueeze(-1)  # share of the earlier keys
    output = torch.lerp(own.float(), earlier.float(), weight).to(query.dtype)
    return output.transpose(1, 2).contiguous()


def takes_causal_tail(model: Any) -> bool:
    """Whether ``model``'s passes over a cache (given :data:`CAUSAL_KWARG`) run
    :func:`causal_tail_attention`: the scoring wrapper over sdpa, on the CPU, in float32 or
    bfloat16, with a torch that has the kernel."""
    return (
        _FLASH_CPU is not None
        and getattr(model.config, "_attn_implementation", None) == _PREFIX + "sdpa"
        and model.device.type == "cpu"
        and model.dtype in (torch.float32, torch.bfloat16)
    )


def enable_scoring(model: Any) -> str:
    """Switch ``model`` (this instance only) to the scoring wrapper of its current attention.

    Idempotent and cheap. Returns the attention implementation name now in use.
    """
    config = model.config
    _check_supported(config)
    current = config._attn_implementation or "sdpa"
    if current.startswith(_PREFIX):
        return current
    name = _PREFIX + current
    with _register_lock:
        if name not in AttentionInterface._global_mapping:
            if current != "eager" and current not in ALL_ATTENTION_FUNCTIONS:
                raise UnsupportedModelError(
                    f"attention implementation {current!r} is not supported for scoring; load the model "
                    "with attn_implementation='sdpa', 'eager' or 'flash_attention_2'."
                )
            AttentionInterface.register(name, _wrapped_attention(current))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
        if config._attn_implementation != name:
            model.set_attn_implementation(name)  # type: ignore[operator]
    return name


def uses_scoring(model: Any) -> bool:
    """Whether ``model`` runs the scoring wrapper (see :func:`enable_scoring`)."""
    return str(getattr(model.config, "_attn_implementation", None) or "").startswith(_PREFIX)


def try_enable_scoring(model: Any) -> bool:
    """:func:`enable_scoring` where ``model`` supports it; ``False`` (nothing changed) elsewhere."""
    try:
        enable_scoring(model)
    except UnsupportedModelError:
        return False
    return True


def _check_supported(config: Any) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if sliding or getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError(
            f"{type(config).__name__} uses sliding-window or other non-full attention layers "
            f"({sorted(set(layer_types)) or 'use_sliding_window=True'}); spec-rag drops and scores KV "
            "entries only for full-attention layers. Use a model whose layers are all full attention "
            "(Llama, Qwen2/2.5/3, SmolLM2, Mistral without sliding window)."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError("encoder-decoder models are not supported; use a decoder-only model.")


class WindowRecorder:
    """Receives window attention probabilities from every layer of one forward pass.

    Args:
        window_start: absolute position of the first scoring query; every query at or after
            it is scored (prompt window queries and, in later passes, lookahead queries).
        num_keys: the scores cover key positions ``[0, num_keys)`` (the prompt).
        layers: layer indices to record; ``None`` records all.
        window_end: absolute position of the first query *not* scored (``None``: no end), so a
            pass that writes more lookahead tokens than it scores can serve both purposes.

    Subclasses implement :meth:`reduce`, which must shrink what it keeps to ``O(L)``.
    """

    #: Whether observing a layer may cut that layer's cache (so the pass cannot be chunked).
    cuts_cache = False

    def __init__(
        self, window_start: int, num_keys: int, layers: range | None = None, window_end: int | None = None
    ) -> None:
        self.window_start = window_start
        self.num_keys = num_keys
        self.layers = layers
        self.window_end = window_end

    def observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        layer = int(getattr(module, "layer_idx", 0))
        if self.layers is not None and layer not in self.layers:
            return
        q_len, k_len = query.shape[2], key.shape[2]
        q_offset = k_len - q_len  # absolute position of query row 0
        first = max(0, self.window_start - q_offset)
        last = q_len if self.window_end is None else min(q_len, self.window_end - q_offset)
        if first >= last:
            return
        batch, heads, _, head_dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        window_q = query[:, :, first:last, :].float()  # [b, heads, wq, d]
        wq = window_q.shape[2]
        window_q = window_q.view(batch, kv_heads, group, wq, head_dim)  # [b, kv, group, wq, d]
        scaling = kwargs.get("scaling") or head_dim**-0.5
        # [b, kv, group, wq, k]
        logits = torch.einsum("bgrqd,bgkd->bgrqk", window_q, key.float()) * scaling
        softcap = kwargs.get("softcap")
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        q_pos = torch.arange(q_offset + first, q_offset + last, device=query.device)  # [wq]
        k_pos = torch.arange(k_len, device=query.device)  # [k]
        hidden = k_pos[None, :] > q_pos[:, None]  # [wq, k]
        logits.masked_fill_(hidden, float("-inf"))
        # Softmax in place: the |Q| x L block is the only sizeable allocation, so keep one copy.
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        logits.div_(logits.sum(dim=-1, keepdim=True))
        probs = logits[..., : self.num_keys]  # [b, kv, group, wq, L]
        self.reduce(layer, probs[0], q_pos)

    def reduce(self, layer: int, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        """``probs``: ``[kv_heads, group, window_queries, num_keys]``; ``query_positions``: ``[wq]``."""
        raise NotImplementedError


def reduce_dims(x: torch.Tensor, dims: tuple[int, ...], how: str) -> torch.Tensor:
    if how == "max":
        return x.amax(dim=dims)
    return x.mean(dim=dims)


class TokenScoreRecorder(WindowRecorder):
    """SpecPC: one importance score per prompt token, reduced over layers, heads and queries."""

    def __init__(
        self,
        window_start: int,
        num_keys: int,
        *,
        layers: range,
        reduction: str = "max",
        weighted_query: bool = True,
        window_end: int | None = None,
    ) -> None:
        super().__init__(window_start, num_keys, layers, window_end)
        self.reduction = reduction
        self.weighted_query = weighted_query
        self.window = max(num_keys - window_start, 1)
        self._total: torch.Tensor | None = None  # [L]
        self._count = 0
        self._lock = threading.Lock()

    def reduce(self, layer: int, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        if self.weighted_query:
            # Rises from 0 (oldest window query) to 1 (newest); lookahead queries weigh 1.
            rel = (query_positions - self.window_start).float() / max(self.window - 1, 1)
            weights = rel.clamp(0.0, 1.0)  # [wq]
            probs = probs * weights[None, None, :, None]
        per_layer = reduce_dims(probs, (0, 1, 2), self.reduction)  # [L]
        with self._lock:
            if self._total is None:
                self._total = per_layer.clone()
            elif self.reduction == "max":
                torch.maximum(self._total, per_layer, out=self._total)
            else:
                self._total += per_layer
            self._count += 1

    def scores(self) -> torch.Tensor:
        if self._total is None:
            raise RuntimeError(
                "no attention was recorded; the draft has fewer layers than starting_layer_index?"
            )
        return self._total if self.reduction == "max" else self._total / self._count


class HeadScoreRecorder(WindowRecorder):
    """SpecKV / SnapKV: one score per (layer, KV head, prompt position).

    ``on_layer``, when given, receives each layer's ``[kv_heads, L]`` scores as soon as they are
    known, instead of keeping them (one forward pass: each layer is observed once). The layer's
    cache then holds that pass's keys and values, so it may be cut right there.
    """

    def __init__(
        self,
        window_start: int,
        num_keys: int,
        *,
        reduction: str = "max",
        on_layer: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        super().__init__(window_start, num_keys)
        self.reduction = reduction
        self.on_layer = on_layer
        self.per_layer: dict[int, torch.Tensor] = {}  # layer -> [kv_heads, L]

    @property
    def cuts_cache(self) -> bool:  # type: ignore[override]
        return self.on_layer is not None

    def reduce(self, layer: int, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        scores = reduce_dims(probs, (1, 2), self.reduction)  # [kv_heads, L]
        if self.on_layer is not None:
            self.on_layer(layer, scores)
            return
        previous = self.per_layer.get(layer)
        self.per_layer[layer] = scores if previous is None else torch.maximum(previous, scores)


class LayerHook(WindowRecorder):
    """Scores nothing: calls ``on_layer(layer, None)`` once per layer of a forward pass, when the
    layer's cache already holds the pass's keys and values (StreamingLLM cuts it there).

    It scores no query, so its window starts past any pass: a chunked prefill may split the pass
    anywhere (:func:`~spec_rag.generation.prefill_chunks` keeps scored queries in the last chunk)."""

    def __init__(self, on_layer: Callable[[int, torch.Tensor | None], None] | None = None) -> None:
        super().__init__(sys.maxsize, 0)
        self.on_layer = on_layer

    @property
    def cuts_cache(self) -> bool:  # type: ignore[override]
        return self.on_layer is not None

    def observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        if self.on_layer is not None:
            self.on_layer(int(getattr(module, "layer_idx", 0)), None)


def pool_scores(scores: torch.Tensor, kernel_size: int, pool_type: str) -> torch.Tensor:
    """Centred 1-D pool over the last dimension, stride 1, same length out as in."""
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1]).float()  # [rows, 1, L]
    left, right = kernel_size // 2, (kernel_size - 1) // 2
    if pool_type == "max":
        padded = F.pad(flat, (left, right), value=float("-inf"))
        out = F.max_pool1d(padded, kernel_size, stride=1)
    else:
        # Average over the positions that exist (no zero padding pulling the edges down).
        ones = torch.ones_like(flat)
        total = F.avg_pool1d(F.pad(flat, (left, right)), kernel_size, stride=1)
        count = F.avg_pool1d(F.pad(ones, (left, right)), kernel_size, stride=1)
        out = total / count
    return out.reshape(shape)

"""Prefill, cache surgery and the token-by-token decode loop shared by every method.

Every method ends its prefill with a :class:`Prefilled` (the target's cache, the last prompt
logits, the RoPE position of the next token); :func:`decode_tokens` takes it from there. The
loop is written out (rather than delegated to ``model.generate``) because after SpecKV the cache
holds ``C`` entries while the next token sits at position ``L``: decoding must pass the true
RoPE positions itself.
"""

from __future__ import annotations

import copy
import inspect
import threading
import types
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from spec_rag.constrained import Guide
from spec_rag.scoring import CAUSAL_KWARG, RECORDER_KWARG, WindowRecorder, takes_causal_tail, uses_scoring


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature`` 0 (or ``None``) means greedy."""

    max_new_tokens: int = 256
    temperature: float | None = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass
class GenerationStats:
    """What one request cost. Token counts are per sequence; ``kv_cache_tokens`` is the number of
    prompt entries each KV head keeps while decoding. ``lookahead_accepted`` counts the draft's
    lookahead tokens the target's own choice (greedy or drawn by the answer's sampler, under the
    answer's grammar, if any) agreed with (SpecKV's verified lookahead): the answer opens with
    them (and the target's next token), as full-cache decoding would write it, as far as
    ``max_new_tokens`` allows."""

    method: str = "full"
    prompt_tokens: int = 0
    target_prefill_tokens: int = 0
    kv_cache_tokens: int = 0
    output_tokens: int = 0
    lookahead_tokens: int = 0
    lookahead_accepted: int = 0
    draft_s: float = 0.0
    target_prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prefilled:
    """What a method's prefill hands to the decode loop.

    Attributes:
        cache: the target's KV cache of the (possibly compressed) prompt; decoding appends to it.
        logits: ``[vocab]`` the target's logits after the last prompt token (after the last
            ``accepted`` token when there are some).
        next_position: RoPE position of the first token the cache does not hold (the prompt
            length the target saw, whatever the cache kept, plus ``len(accepted)``).
        extras: method-specific outputs a later stage may use (e.g. the lookahead tokens).
        accepted: the answer's first tokens, already decided (a verified lookahead); the cache
            holds their entries, so decoding emits them without a forward.
    """

    cache: DynamicCache
    logits: torch.Tensor
    next_position: int
    extras: dict[str, Any] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)


@dataclass
class DecodeResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


def new_cache(model: Any) -> DynamicCache:
    return DynamicCache(config=model.config)


_CACHE_ARGUMENT: dict[Any, str] = {}


def _cache_argument(model_class: Any) -> str:
    """The keyword ``model_class.forward`` takes the KV cache under (looked up once per class).

    Recent transformers releases name it ``cache`` and warn on the older ``past_key_values``;
    earlier 5.x releases only know ``past_key_values``.
    """
    name = _CACHE_ARGUMENT.get(model_class)
    if name is None:
        try:
            takes_cache = "cache" in inspect.signature(model_class.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        name = _CACHE_ARGUMENT[model_class] = "cache" if takes_cache else "past_key_values"
    return name


#: A forward over more tokens than this runs each layer's feed-forward block this many tokens at
#: a time: its ``[tokens, intermediate]`` activations are the largest tensors of a long prefill.
FFN_CHUNK_TOKENS = 1024
_FFN_CHUNK: ContextVar[int | None] = ContextVar("spec_rag_ffn_chunk", default=None)
_FFN_FLAG = "_spec_rag_chunked_ffn"
_ffn_lock = threading.Lock()


def _chunked_ffn(block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``block``'s own forward of ``hidden`` (``[b, q, hidden]``), ``chunk`` tokens at a time
    inside :func:`forward`.

    The gated feed-forward (``down(act(gate(x)) * up(x))``) treats every token on its own, so
    the rows come out as one call would give them; only the ``[q, intermediate]`` temporaries
    shrink to ``[chunk, intermediate]``. Outside :func:`forward` it is the class's forward.
    """
    original = type(block).forward
    chunk = _FFN_CHUNK.get()
    if chunk is None or hidden.dim() != 3 or hidden.shape[1] <= chunk:
        return original(block, hidden)
    return torch.cat([original(block, part) for part in hidden.split(chunk, dim=1)], dim=1)  # [b, q, hidden]


def chunk_feed_forward(model: Any) -> bool:
    """Let this model instance's feed-forward blocks run in token chunks during :func:`forward`.

    Only gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``: Llama, Qwen2/3, Mistral, SmolLM2)
    whose ``forward`` nobody else has replaced (e.g. offloading hooks) are wrapped, through the
    instance's own ``forward`` attribute, so parameter names, other instances and calls outside
    :func:`forward` are unchanged. Idempotent; returns whether any block was wrapped.
    """
    done = getattr(model, _FFN_FLAG, None)
    if done is None:
        with _ffn_lock:
            done = getattr(model, _FFN_FLAG, None)
            if done is None:
                done = False
                for block in model.modules():
                    gated = all(
                        isinstance(getattr(block, name, None), torch.nn.Linear)
                        for name in ("gate_proj", "up_proj", "down_proj")
                    )
                    if gated and "forward" not in vars(block):
                        block.forward = types.MethodType(_chunked_ffn, block)
                        done = True
                setattr(model, _FFN_FLAG, done)
    return bool(done)


def prefill_chunks(
    length: int,
    chunk_size: int | None,
    *,
    tail: int = 1,
    recorder: WindowRecorder | None = None,
    offset: int = 0,
) -> list[tuple[int, int]]:
    """``[(start, end)]`` slices of a ``length``-token pass (its first token at absolute position
    ``offset``), ``chunk_size`` tokens each, the last one holding at least the last ``tail`` rows
    and every query ``recorder`` scores, so scores and kept logits all come from one chunk.

    One slice (no chunking) when ``chunk_size`` is ``None`` or not below ``length``.
    """
    if chunk_size is None or length <= chunk_size:
        return [(0, length)]
    if chunk_size <= 0:
        raise ValueError(f"prefill_chunk_size must be positive, or None for one pass (got {chunk_size}).")
    last = ((length - 1) // chunk_size) * chunk_size  # start of the last regular chunk
    last = min(last, length - max(tail, 1))
    if recorder is not None:
        last = min(last, max(recorder.window_start - offset, 0))
    last = max(last, 0)
    return [(start, min(start + chunk_size, last)) for start in range(0, last, chunk_size)] + [(last, length)]


@torch.inference_mode()
def forward(
    model: Any,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    *,
    position_start: int | None = None,
    recorder: WindowRecorder | None = None,
    logits_to_keep: int = 1,
    prefill_chunk_size: int | None = None,
) -> torch.Tensor:
    """Run ``input_ids`` (``[1, q]``) through the model on top of ``cache``.

    Returns the logits of the last ``logits_to_keep`` positions, ``[logits_to_keep, vocab]``.
    ``position_start`` overrides the RoPE position of the first token (default: cache length).
    ``prefill_chunk_size`` runs a longer ``input_ids`` in chunks of that many tokens, each on the
    cache the earlier ones filled (the same keys, values and logits as one pass, up to rounding);
    the recorder sees the last chunk only, which holds all of its queries (:func:`prefill_chunks`).
    A recorder that cuts each layer's cache as it scores it (SpecKV, SnapKV, StreamingLLM with one
    budget) gets the chunks layer by layer where the model allows (:func:`layer_stack`), so only
    one layer's cache is ever whole; elsewhere its prefill runs as one pass. Within a pass, more
    than :data:`FFN_CHUNK_TOKENS` tokens run the feed-forward blocks in chunks of that many (see
    :func:`chunk_feed_forward`): both bound a long prefill's largest activations.
    """
    offset = cache_length(cache) if position_start is None else position_start
    slices = prefill_chunks(
        input_ids.shape[1], prefill_chunk_size, tail=logits_to_keep, recorder=recorder, offset=offset
    )
    if len(slices) > 1 and recorder is not None and recorder.cuts_cache:
        # Chunk by chunk, every layer's whole cache would stay alive until the last chunk; layer
        # by layer, only one layer's is, and each layer is cut before the next one runs.
        stack = layer_stack(model)
        if stack is None:
            slices = [(0, input_ids.shape[1])]  # one pass: it cuts each layer inside the forward
        else:
            return _layer_major_pass(
                model,
                stack,
                input_ids,
                slices,
                cache,
                offset=offset,
                recorder=recorder,
                logits_to_keep=logits_to_keep,
            )
    for start, end in slices:
        logits = _forward_pass(
            model,
            input_ids[:, start:end],
            cache,
            position_start=None if position_start is None else position_start + start,
            recorder=recorder if end == input_ids.shape[1] else None,
            logits_to_keep=logits_to_keep if end == input_ids.shape[1] else 1,
        )
    return logits


def _forward_pass(
    model: Any,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    *,
    position_start: int | None = None,
    recorder: WindowRecorder | None = None,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """One forward of :func:`forward`."""
    kwargs: dict[str, Any] = {}
    if position_start is not None:
        positions = torch.arange(position_start, position_start + input_ids.shape[1], device=input_ids.device)
        kwargs["position_ids"] = positions[None, :]
    if recorder is not None:
        kwargs[RECORDER_KWARG] = recorder
    if input_ids.shape[1] > 1 and uses_scoring(model):
        kwargs[CAUSAL_KWARG] = True  # our masks are causal to the cache's end: a faster CPU kernel
    kwargs[_cache_argument(type(model))] = cache
    chunked = input_ids.shape[1] > FFN_CHUNK_TOKENS and chunk_feed_forward(model)
    token = _FFN_CHUNK.set(FFN_CHUNK_TOKENS) if chunked else None
    try:
        out = model(
            input_ids=input_ids.to(model.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    finally:
        if token is not None:
            _FFN_CHUNK.reset(token)
    return out.logits[0].float()  # [logits_to_keep, vocab]


#: Model types whose causal LM is ``lm_head(norm(layers(embed_tokens(ids))))`` with RoPE from
#: ``model.rotary_emb``: no embedding scale, logit scale or soft-capping of their own.
_LAYER_MAJOR_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def layer_stack(model: Any) -> tuple[Any, Any, Any, Any] | None:
    """``(embed_tokens, layers, norm, rotary_emb)`` of ``model`` where :func:`forward` may run a
    cutting prefill layer by layer: a plain decoder stack of a known family whose passes over a
    cache take the causal-tail path (:func:`~spec_rag.scoring.takes_causal_tail`, so chunks need
    no mask); ``None`` elsewhere (such a prefill then runs as one pass)."""
    base = getattr(model, "model", None)
    if getattr(model.config, "model_type", None) not in _LAYER_MAJOR_TYPES or base is None:
        return None
    parts = tuple(getattr(base, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
    if any(part is None for part in parts) or getattr(model, "lm_head", None) is None:
        return None
    return parts if takes_causal_tail(model) else None  # type: ignore[return-value]


def _layer_major_pass(
    model: Any,
    stack: tuple[Any, Any, Any, Any],
    input_ids: torch.Tensor,
    slices: list[tuple[int, int]],
    cache: DynamicCache,
    *,
    offset: int,
    recorder: WindowRecorder,
    logits_to_keep: int,
) -> torch.Tensor:
    """:func:`forward` of a prefill whose recorder cuts each layer's cache, run layer by layer.

    Each layer reads the pass in ``slices`` (every chunk on the keys the earlier ones left in
    that layer's cache, the recorder on the last), writing its output over its input: the
    hidden states of the whole pass are one ``[q, hidden]`` buffer, and only the running layer's
    cache is ever whole (the recorder cuts it before the next layer starts). The same keys,
    values, scores and logits as one pass, up to rounding.
    """
    embed, layers, norm, rotary = stack
    length = input_ids.shape[1]
    hidden = embed(input_ids.to(model.device))  # [1, q, hidden]
    positions = torch.arange(offset, offset + length, device=hidden.device)[None, :]  # [1, q]
    # per chunk: its positions and RoPE tables, the same for every layer
    chunks = [(start, end, positions[:, start:end]) for start, end in slices]
    rope = [rotary(hidden, part) for _, _, part in chunks]
    kwargs: dict[str, Any] = {CAUSAL_KWARG: True, "use_cache": True, _cache_argument(type(layers[0])): cache}
    token = _FFN_CHUNK.set(FFN_CHUNK_TOKENS) if chunk_feed_forward(model) else None
    try:
        for layer in layers:
            for (start, end, part), embeddings in zip(chunks, rope, strict=True):
                extra = {RECORDER_KWARG: recorder} if end == length else {}
                out = layer(
                    hidden[:, start:end],
                    attention_mask=None,  # causal: the first chunk by sdpa's flag, the rest by CAUSAL_KWARG
                    position_ids=part,
                    position_embeddings=embeddings,
                    **kwargs,
                    **extra,
                )
                hidden[:, start:end] = out[0] if isinstance(out, tuple) else out
    finally:
        if token is not None:
            _FFN_CHUNK.reset(token)
    last = norm(hidden[:, length - logits_to_keep :])
    del hidden
    return model.lm_head(last)[0].float()  # [logits_to_keep, vocab]


def keep_cache_positions(cache: DynamicCache, positions: torch.Tensor) -> None:
    """Keep only ``positions`` in every layer of ``cache``, in place.

    ``positions`` is ``[C]`` (same for every head) or ``[layers, kv_heads, C]`` (per head).
    Each layer stays a dense ``[batch, kv_heads, C, head_dim]`` tensor.
    """
    for index, layer in enumerate(cache.layers):
        keep_layer_positions(layer, positions if positions.dim() == 1 else positions[index])


def keep_layer_positions(layer: Any, positions: torch.Tensor) -> None:
    """Keep only ``positions`` (``[C]``, or ``[kv_heads, C]`` per head) of one cache layer."""
    keys, values = layer.keys, layer.values  # [b, kv_heads, len, head_dim]
    if positions.dim() == 1:
        layer.keys = keys[:, :, positions.to(keys.device), :].contiguous()
        layer.values = values[:, :, positions.to(keys.device), :].contiguous()
        return
    idx = positions.to(keys.device)  # [kv_heads, C]
    idx = idx[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])  # [b, kv, C, d]
    layer.keys = torch.gather(keys, 2, idx).contiguous()
    layer.values = torch.gather(values, 2, idx).contiguous()


def cache_view(cache: DynamicCache, positions: torch.Tensor | None = None) -> DynamicCache:
    """A cache holding ``positions`` of ``cache`` (all of it for ``None``); ``cache`` is untouched.

    Layers are copied shallowly and then gathered, so the view costs the kept entries only;
    decoding appends by concatenation and never writes into ``cache``'s tensors.
    """
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    if positions is not None:
        keep_cache_positions(view, positions)
    return view


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


class Sampler:
    """How one answer chooses its tokens: greedy, or sampled from its own random generator
    (seeded by ``params.seed``, else from the system's entropy).

    One answer's tokens are all drawn from one sampler: a verified lookahead's draws (see
    :func:`~spec_rag.methods.base.verified_length`) and then the decoding's, so a seeded answer
    is the same on every run. Not shared between answers or threads.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from ``[vocab]`` logits (masked ones: ``-inf``)."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        logits = logits / float(p.temperature or 1.0)
        if p.top_k and p.top_k > 0:
            kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the first token always
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def state(self) -> torch.Tensor | None:
        """The generator's state, for :meth:`restore` (``None`` when greedy: nothing is drawn)."""
        return None if self.generator is None else self.generator.get_state()

    def restore(self, state: torch.Tensor | None) -> None:
        """Take back the draws since :meth:`state`: the next call draws as that one did."""
        if self.generator is not None and state is not None:
            self.generator.set_state(state)


def decode_tokens(
    model: Any,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    *,
    next_position: int,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    recorder: WindowRecorder | None = None,
    result: DecodeResult | None = None,
    feed_last: bool = False,
    accepted: Sequence[int] = (),
    guide: Guide | None = None,
    sampler: Sampler | None = None,
) -> Iterator[int]:
    """Yield up to ``params.max_new_tokens`` token ids; the EOS token ends it and is not yielded.

    ``first_logits`` are the logits of the last prompt token; token ``i`` is fed at RoPE
    position ``next_position + i``. ``result`` (if given) collects the ids and finish reason.
    ``feed_last`` also runs the final token through the model (the one the grammar completes on,
    too), so a recorder sees its query.

    ``accepted`` tokens come first, as they are: the cache already holds their entries, so they
    cost no forward; ``first_logits`` are then the logits after the last of them and
    ``next_position`` the position after it.

    ``guide`` (constrained decoding) masks the logits before each choice, advances with every
    token (the ``accepted`` ones too: the caller checked them with ``guide.count_accepted``) and
    ends the answer once its grammar is complete.

    ``sampler`` (a sampled answer's, which may already have drawn its verified lookahead): draws
    the tokens; ``None``: a new one of ``params``.
    """
    result = result if result is not None else DecodeResult()
    sampler = sampler if sampler is not None else Sampler(params, first_logits.device)
    eos = set(eos_token_ids)
    logits = first_logits
    position = next_position
    for step in range(params.max_new_tokens):
        drafted = step < len(accepted)
        if drafted:
            token = accepted[step]
        else:
            if guide is not None:
                logits = guide.mask_logits(logits)  # [vocab]
            token = sampler(logits)
        if guide is not None:
            guide.advance(token)
        if token in eos:
            result.finish_reason = "stop"
            return
        result.token_ids.append(token)
        yield token
        finished = guide is not None and guide.is_finished  # the grammar is complete: stop
        last = finished or step + 1 == params.max_new_tokens
        # An accepted token's entry is already cached; the last token needs no forward (unless fed).
        if not drafted and (feed_last or not last):
            ids = torch.tensor([[token]], device=model.device)
            logits = forward(model, ids, cache, position_start=position, recorder=recorder)[-1]
            position += 1
        if finished:
            result.finish_reason = "stop"
            return
    result.finish_reason = "length"


class TextStream:
    """Turns token ids into text deltas; applies stop strings and holds back partial characters.

    Text is re-decoded from all ids each step (so multi-token characters and tokenizer spacing
    come out right) and only the settled prefix is emitted: never a replacement character of an
    unfinished UTF-8 sequence, never the start of a stop string that may still complete.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), hold_from: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        #: text from the first ``hold_from`` on (a tool call's opening tag) is never emitted
        self.hold_from = hold_from
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        settled = len(self.text)
        if not self.stopped:
            settled = len(self.text.rstrip("\ufffd"))
            held = [*self.stop, self.hold_from] if self.hold_from else self.stop
            settled -= max((self._partial_stop(self.text[:settled], s) for s in held), default=0)
        if self.hold_from and self.hold_from in self.text:
            settled = min(settled, self.text.index(self.hold_from))
        settled = max(settled, self.emitted)
        delta = self.text[self.emitted : settled]
        self.emitted = settled
        return delta

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

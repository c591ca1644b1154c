"""SpecEngine: one object that answers prompts with full inference, SpecPC, SpecKV, SpecKV-PC,
SnapKV or StreamingLLM, with the same statistics for each so they compare fairly."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import torch

from spec_rag._prompt import (
    Prompt,
    check_fits,
    check_prompt,
    encode,
    encode_prompt,
    eos_ids,
    is_messages,
    same_vocabulary,
)
from spec_rag.config import (
    EngineConfig,
    SnapKVConfig,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    StreamingLLMConfig,
)
from spec_rag.errors import InvalidInputError
from spec_rag.generation import (
    DecodeResult,
    SamplingParams,
    TextStream,
    decode_tokens,
    forward,
    keep_cache_positions,
    new_cache,
)
from spec_rag.scoring import HeadScoreRecorder, enable_scoring
from spec_rag.selection import select_kv_positions, streaming_positions
from spec_rag.specpc import Compression, SpecPC, draft_pass


@dataclass
class GenerationStats:
    """What one request cost. Token counts are per sequence; ``kv_cache_tokens`` is the number of
    prompt entries each KV head keeps while decoding."""

    method: str = "full"
    prompt_tokens: int = 0
    target_prefill_tokens: int = 0
    kv_cache_tokens: int = 0
    output_tokens: int = 0
    lookahead_tokens: int = 0
    draft_s: float = 0.0
    target_prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


class GenerationStream:
    """Iterator of text deltas; ``generation`` holds the finished :class:`Generation` at the end.

    Closing it early (``close()``, ``break`` out of a ``for`` loop and dropping it) stops the
    work: generation runs in the consumer's thread, so nothing is left running.
    """

    def __init__(
        self, engine: SpecEngine, prompt: Prompt, params: SamplingParams, prefill: Prefill | None = None
    ) -> None:
        self.generation: Generation | None = None
        self._iterator = engine._run(prompt, params, self, prefill)

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()


_NEEDS_DRAFT = (SpecPCConfig, SpecKVConfig, SpecKVPCConfig)

#: A prefill step: fills in its part of the stats and returns the target's cache (compressed as
#: the method says), the last prompt logits and the RoPE position of the next token.
Prefill = Callable[[GenerationStats], tuple[Any, torch.Tensor, int]]


class SpecEngine:
    """Answers prompts with a target model, guided by a draft model.

    Args:
        target: the large model that writes the answer (a Hugging Face causal LM).
        tokenizer: the target's tokenizer.
        draft: the small model (needed for SpecPC, SpecKV and SpecKV-PC).
        draft_tokenizer: the draft's tokenizer (default: ``tokenizer``). When the two
            vocabularies differ, text is handed over instead of token ids.
        config: a method config; ``None`` means full inference.

    One engine may serve several threads at once: every request keeps its own cache.
    """

    def __init__(
        self,
        target: Any,
        tokenizer: Any,
        draft: Any = None,
        draft_tokenizer: Any = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer
        self.config = config
        _check_tokenizer_fits(target, tokenizer, "target")
        if isinstance(config, _NEEDS_DRAFT):
            if draft is None:
                raise InvalidInputError(
                    f"method {config.method!r} needs a draft model: pass draft=... (and draft_tokenizer=... "
                    "if its tokenizer differs), or use SnapKVConfig / StreamingLLMConfig / config=None, "
                    "which need none."
                )
            _check_tokenizer_fits(draft, self.draft_tokenizer, "draft")
        self.shared_vocabulary = draft is not None and same_vocabulary(tokenizer, self.draft_tokenizer)
        if isinstance(config, SpecKVConfig | SnapKVConfig | SpecKVPCConfig):
            enable_scoring(target)
        self._specpc: SpecPC | None = None
        if isinstance(config, SpecPCConfig | SpecKVPCConfig):
            pc_config = config if isinstance(config, SpecPCConfig) else config.specpc
            self._specpc = SpecPC(draft, self.draft_tokenizer, pc_config)
        elif isinstance(config, SpecKVConfig):
            enable_scoring(draft)  # harmless; keeps the draft's dispatch identical across methods
        self._target_eos = eos_ids(target, tokenizer)
        self._draft_eos = eos_ids(draft, self.draft_tokenizer) if draft is not None else []

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        config: EngineConfig | None = None,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | None = None,
    ) -> SpecEngine:
        """Load (or reuse, from the process-wide model cache) target and draft by name or path."""
        from spec_rag.models import get_model

        target_model, target_tokenizer = get_model(target, dtype=dtype, device=device)
        draft_model = draft_tokenizer = None
        if draft is not None:
            draft_model, draft_tokenizer = get_model(draft, dtype=dtype, device=device)
        return cls(target_model, target_tokenizer, draft_model, draft_tokenizer, config)

    def with_config(self, config: EngineConfig | None) -> SpecEngine:
        """The same models under another method or budget (no reload)."""
        return SpecEngine(self.target, self.tokenizer, self.draft, self.draft_tokenizer, config)

    @property
    def method(self) -> str:
        return "full" if self.config is None else self.config.method

    # -- public API ------------------------------------------------------------------------
    @overload
    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = ...,
        temperature: float | None = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int | None = ...,
        stop: Sequence[str] | str | None = ...,
    ) -> Generation: ...

    @overload
    def generate(
        self,
        prompt: list[str] | list[list[dict[str, Any]]],
        *,
        max_new_tokens: int = ...,
        temperature: float | None = ...,
        top_p: float = ...,
        top_k: int = ...,
        seed: int | None = ...,
        stop: Sequence[str] | str | None = ...,
    ) -> list[Generation]: ...

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        temperature: float | None = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> Generation | list[Generation]:
        """Answer one prompt (a string fed as-is, or chat messages) or a list of prompts.

        ``temperature`` 0 is greedy. ``stop`` strings end the answer (not included).
        A list of prompts is answered one by one and gives a list of generations.
        """
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if _is_batch(prompt):
            return [self._complete(p, params) for p in prompt]  # type: ignore[arg-type]
        return self._complete(prompt, params)  # type: ignore[arg-type]

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        temperature: float | None = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> GenerationStream:
        """Yield the answer as text deltas while it is generated (see :class:`GenerationStream`)."""
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
        check_prompt(prompt)
        return GenerationStream(self, prompt, params)

    def _complete(self, prompt: Prompt, params: SamplingParams, prefill: Prefill | None = None) -> Generation:
        """Answer ``prompt``; ``prefill`` replaces the method's own prefill (the evaluation harness
        uses it to serve several methods and budgets from one target prefill)."""
        stream = GenerationStream(self, prompt, params, prefill)
        for _ in stream:
            pass
        assert stream.generation is not None
        return stream.generation

    # -- the pipeline ----------------------------------------------------------------------
    def _run(
        self, prompt: Prompt, params: SamplingParams, sink: GenerationStream, prefill: Prefill | None = None
    ) -> Generator[str, None, None]:
        start = time.perf_counter()
        stats = GenerationStats(method=self.method)
        check_prompt(prompt)
        if params.max_new_tokens == 0:
            stats.total_s = time.perf_counter() - start
            sink.generation = Generation(text="", finish_reason="length", stats=stats)
            return
        if prefill is None:
            cache, logits, next_position = self._prefill(prompt, params, stats)
        else:
            cache, logits, next_position = prefill(stats)
        decode_start = time.perf_counter()
        result = DecodeResult()
        text = TextStream(self.tokenizer, params.stop)
        for token in decode_tokens(
            self.target,
            cache,
            logits,
            next_position=next_position,
            params=params,
            eos_token_ids=self._target_eos,
            result=result,
        ):
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                result.finish_reason = "stop"
                break
        tail = text.flush()
        if tail:
            yield tail
        now = time.perf_counter()
        stats.output_tokens = len(result.token_ids)
        stats.decode_s = now - decode_start
        stats.total_s = now - start
        sink.generation = Generation(
            text=text.text, token_ids=result.token_ids, finish_reason=result.finish_reason, stats=stats
        )

    def _prefill(
        self, prompt: Prompt, params: SamplingParams, stats: GenerationStats
    ) -> tuple[Any, torch.Tensor, int]:
        """Returns the target's cache (compressed as the method says), the last prompt logits and
        the RoPE position of the next token."""
        config = self.config
        lookahead: list[int] = []
        if isinstance(config, SpecPCConfig | SpecKVPCConfig):
            ids, lookahead = self._compress_prompt(prompt, params, stats)
        else:
            ids = encode_prompt(self.tokenizer, prompt)["input_ids"]
            stats.prompt_tokens = ids.numel()
        length = ids.numel()
        check_fits(self.target, length + len(lookahead), role="target")
        stats.target_prefill_tokens = length

        kv_config = config.speckv if isinstance(config, SpecKVPCConfig) else config
        if isinstance(kv_config, SpecKVConfig | SnapKVConfig) and kv_config.max_capacity_prompt < length:
            return self._prefill_speckv(prompt, ids, lookahead, kv_config, params, stats)

        cache = new_cache(self.target)
        t0 = time.perf_counter()
        logits = forward(self.target, ids[None], cache)[-1]
        if isinstance(config, StreamingLLMConfig) and config.max_capacity_prompt < length:
            keep_cache_positions(
                cache, streaming_positions(length, config.max_capacity_prompt, config.sink_tokens)
            )
        stats.target_prefill_s = time.perf_counter() - t0
        stats.kv_cache_tokens = int(cache.get_seq_length())
        return cache, logits, length

    def _compress_prompt(
        self, prompt: Prompt, params: SamplingParams, stats: GenerationStats
    ) -> tuple[torch.Tensor, list[int]]:
        """SpecPC (and SpecKV-PC's first half): target prompt ids after compression, and the
        draft's lookahead in target ids."""
        assert self._specpc is not None
        cascade = isinstance(self.config, SpecKVPCConfig)
        n = self._lookahead_length(params) if cascade else None
        t0 = time.perf_counter()
        compression: Compression
        if self.shared_vocabulary:
            enc = encode_prompt(self.tokenizer, prompt, offsets=True)
            compression = self._specpc.compress_encoded(
                enc["text"], enc["input_ids"], enc["offsets"], lookahead_tokens=n
            )
            ids = compression.input_ids
            lookahead = compression.lookahead_ids
        else:
            if n is None:
                compression = self._specpc.compress(prompt)
            else:
                enc = encode_prompt(self.draft_tokenizer, prompt, offsets=True)
                compression = self._specpc.compress_encoded(
                    enc["text"], enc["input_ids"], enc["offsets"], lookahead_tokens=n
                )
            if is_messages(prompt) and compression.messages is None:
                compression.messages = SpecPC._compressed_messages(
                    prompt,  # type: ignore[arg-type]
                    enc["text"],
                    enc["offsets"],
                    compression.kept_positions,
                )
            kept_prompt: Prompt = (
                compression.messages if compression.messages is not None else compression.text
            )
            ids = encode_prompt(self.tokenizer, kept_prompt)["input_ids"]
            lookahead = self._to_target_ids(compression.lookahead_ids)
        stats.draft_s += time.perf_counter() - t0
        stats.prompt_tokens = compression.original_tokens
        stats.lookahead_tokens = len(lookahead) if cascade else 0
        return ids, (lookahead if cascade else [])

    def _prefill_speckv(
        self,
        prompt: Prompt,
        ids: torch.Tensor,
        lookahead: list[int],
        config: SpecKVConfig | SnapKVConfig,
        params: SamplingParams,
        stats: GenerationStats,
    ) -> tuple[Any, torch.Tensor, int]:
        length = ids.numel()
        if isinstance(config, SpecKVConfig) and not lookahead:
            lookahead = self._draft_lookahead(prompt, ids, params, stats)
        stats.lookahead_tokens = len(lookahead)
        window = min(config.window_size, length)
        recorder = HeadScoreRecorder(length - window, length, reduction=config.reduction_type)
        full_ids = torch.cat([ids, torch.tensor(lookahead, dtype=torch.long)])  # [L + n]
        cache = new_cache(self.target)
        t0 = time.perf_counter()
        # Logits of the last prompt token: position L - 1, i.e. n + 1 from the end.
        logits = forward(
            self.target, full_ids[None], cache, recorder=recorder, logits_to_keep=len(lookahead) + 1
        )[0]
        positions = torch.stack(
            [
                select_kv_positions(
                    recorder.per_layer[layer],
                    length,
                    config.max_capacity_prompt,
                    window_size=window,
                    kernel_size=config.kernel_size,
                    pool_type=config.pool_type,
                )
                for layer in range(len(cache.layers))
            ]
        )  # [layers, kv_heads, C]
        keep_cache_positions(cache, positions)  # also drops the lookahead's entries
        stats.target_prefill_s = time.perf_counter() - t0
        stats.kv_cache_tokens = int(cache.get_seq_length())
        return cache, logits, length

    def _lookahead_length(self, params: SamplingParams) -> int:
        config = self.config
        kv = config.speckv if isinstance(config, SpecKVPCConfig) else config
        n = kv.lookahead_tokens if isinstance(kv, SpecKVConfig) else None
        return params.max_new_tokens if n is None else n

    def _draft_lookahead(
        self, prompt: Prompt, target_ids: torch.Tensor, params: SamplingParams, stats: GenerationStats
    ) -> list[int]:
        """SpecKV step 1: the draft's greedy approximate answer, in target token ids."""
        n = self._lookahead_length(params)
        if n == 0:
            return []
        t0 = time.perf_counter()
        draft_ids = (
            target_ids if self.shared_vocabulary else encode_prompt(self.draft_tokenizer, prompt)["input_ids"]
        )
        check_fits(self.draft, draft_ids.numel() + n, role="draft")
        answer = draft_pass(self.draft, draft_ids, lookahead_tokens=n, eos_token_ids=self._draft_eos)
        stats.draft_s += time.perf_counter() - t0
        return answer if self.shared_vocabulary else self._to_target_ids(answer)

    def _to_target_ids(self, draft_ids: list[int]) -> list[int]:
        if self.shared_vocabulary or not draft_ids:
            return list(draft_ids)
        text = self.draft_tokenizer.decode(draft_ids, skip_special_tokens=True)
        if not text:
            return []
        return encode(self.tokenizer, text, templated=True)["input_ids"].tolist()


def _params(
    max_new_tokens: int,
    temperature: float | None,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] | str | None,
) -> SamplingParams:
    if max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be 0 or more (got {max_new_tokens}).")
    if temperature is not None and temperature < 0:
        raise InvalidInputError(f"temperature must be 0 (greedy) or positive (got {temperature}).")
    if not 0 < top_p <= 1:
        raise InvalidInputError(f"top_p must be in (0, 1] (got {top_p}).")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stops)


def _is_batch(prompt: Any) -> bool:
    if isinstance(prompt, str) or is_messages(prompt):
        return False
    return (
        isinstance(prompt, Sequence)
        and len(prompt) > 0
        and all(isinstance(p, str) or is_messages(p) for p in prompt)
    )


def _check_tokenizer_fits(model: Any, tokenizer: Any, role: str) -> None:
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise InvalidInputError(
            f"the {role} tokenizer has {len(tokenizer)} tokens but the {role} model embeds only "
            f"{embeddings}: they do not belong together. Pass the tokenizer saved with the {role} model."
        )

"""Typed, validated configurations for every method spec-rag runs.

Field names and defaults follow "Draft-based Approximate Inference for LLMs" (Galim et al.,
ICLR 2026); docs/algorithms.md explains each method. Each config is a pydantic model, so a wrong
value fails at construction with a message that says what to change.

This module is also the registry of methods: each config class names its method, declares what
the method does and needs (:class:`MethodInfo`) and points to the module under
:mod:`spec_rag.methods` that runs it, imported only when an engine is built. Adding a method is
one module under ``spec_rag/methods/`` plus its config class here, listed in ``_CONFIGS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spec_rag.errors import InvalidInputError

PoolType = Literal["max", "avg"]

#: The prompt's first tokens, which every SpecPC chunk starts with: they take the attention a
#: model gives to a sequence's first positions (the attention sinks), which a chunk's first
#: slice token would otherwise receive (docs/algorithms.md, "Beyond the draft's window").
CHUNK_SINK_TOKENS = 4
ReductionType = Literal["max", "mean"]


@dataclass(frozen=True)
class MethodInfo:
    """What a method does and needs, declared once for the engine, the CLI and the adapters.

    Attributes:
        name: the method's name as users type it (``"speckv-pc"``).
        needs_draft: a draft model must be given.
        uses_lookahead: the draft writes tokens after the prompt whose attention counts, so
            ``lookahead_tokens`` means something.
        compresses_prompt: the target sees fewer prompt tokens than the user sent.
        compresses_cache: the target's KV cache holds fewer prompt entries while decoding.
    """

    name: str
    needs_draft: bool
    uses_lookahead: bool
    compresses_prompt: bool
    compresses_cache: bool


FULL = MethodInfo(
    "full", needs_draft=False, uses_lookahead=False, compresses_prompt=False, compresses_cache=False
)


class _Config(BaseModel):
    """A method's settings. Subclasses set the class variables below; nothing else is needed
    for the engine, the CLI and the adapters to find the method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: what the method does and needs; ``info.name`` is the method's name
    info: ClassVar[MethodInfo]
    #: ``"module:Class"`` of the :class:`spec_rag.methods.Method` that runs this config
    implementation: ClassVar[str]

    @property
    def method(self) -> str:
        return self.info.name

    @property
    def budget(self) -> int:
        """The budget a sweep varies: prompt tokens (SpecPC) or KV entries per head kept."""
        return int(getattr(self, "max_capacity_prompt"))  # noqa: B009 - every config has one

    def with_budget(self, budget: int) -> _Config:
        """The same settings at another budget, validated like a new config."""
        return type(self)(**{**self.model_dump(), "max_capacity_prompt": budget})

    @classmethod
    def from_fields(cls, method: str, fields: dict[str, Any]) -> _Config:
        """The config from user-given fields; a field the method does not take is an error."""
        _check_fields(method, fields, set(cls.model_fields))
        return cls(**fields)


class SpecPCConfig(_Config):
    """SpecPC: the draft's attention picks which prompt tokens the target sees.

    Args:
        max_capacity_prompt: budget ``C``, prompt tokens kept (the paper uses 1024-3072).
        window_size: ``w``, the last prompt tokens used as scoring queries; always kept.
        kernel_size: width of the smoothing pool over token scores (odd or even; centred).
        neighbor_tokens: each ranked token is expanded to this many positions around it,
            nearest first, so phrases survive when the budget runs out.
        pool_type: ``"max"`` or ``"avg"`` smoothing.
        reduction_type: how heads, queries and layers are combined (``"max"`` or ``"mean"``).
        lookahead_tokens: ``n``, tokens the draft generates after the prompt whose attention
            also counts (the paper finds 1 is enough).
        starting_layer_index: draft layers before this are ignored (early layers attend
            broadly and add noise). Clamped to the draft's depth.
        weighted_query: weight window queries linearly from 0 (oldest) to 1 (newest).
        keep_special_tokens: never drop the chat template's special tokens, so the compressed
            prompt is still a well-formed chat. Special-token text inside documents or other
            message content is ordinary text (it is tokenised split), so it is never protected.
        chunk_size: the longest sequence one draft pass reads (``None``: the draft's context
            window). A longer prompt is scored in overlapping chunks, each one slice of the
            prompt followed by its last ``window_size`` tokens (the question), and selected
            once over the whole prompt; a prompt that fits is scored whole. Clamped to the
            draft's window; lower it to bound the draft's working memory.
        chunk_overlap: prompt tokens two neighbouring chunks share (at most half a chunk's
            slice), so a passage cut by a chunk boundary is read whole by one of them.
    """

    max_capacity_prompt: Annotated[int, Field(gt=0)] = 1024
    window_size: Annotated[int, Field(ge=0)] = 64
    kernel_size: Annotated[int, Field(ge=1)] = 64
    neighbor_tokens: Annotated[int, Field(ge=1)] = 64
    pool_type: PoolType = "max"
    reduction_type: ReductionType = "max"
    lookahead_tokens: Annotated[int, Field(ge=0)] = 1
    starting_layer_index: Annotated[int, Field(ge=0)] = 8
    weighted_query: bool = True
    keep_special_tokens: bool = True
    chunk_size: Annotated[int, Field(gt=0)] | None = None
    chunk_overlap: Annotated[int, Field(ge=0)] = 256

    @model_validator(mode="after")
    def _window_within_budget(self) -> SpecPCConfig:
        if self.window_size > self.max_capacity_prompt:
            raise ValueError(
                f"window_size ({self.window_size}) is larger than max_capacity_prompt "
                f"({self.max_capacity_prompt}): the last window_size tokens are always kept, so the "
                "budget must hold them. Raise max_capacity_prompt or lower window_size."
            )
        fixed = self.window_size + self.lookahead_tokens + CHUNK_SINK_TOKENS
        if self.chunk_size is not None and self.chunk_size <= fixed:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) leaves no room for prompt tokens: each chunk also "
                f"holds the window ({self.window_size}), the lookahead ({self.lookahead_tokens}) and "
                f"{CHUNK_SINK_TOKENS} sink tokens. Raise chunk_size well above {fixed} (a few thousand "
                "tokens is typical)."
            )
        return self

    info: ClassVar[MethodInfo] = MethodInfo(
        "specpc", needs_draft=True, uses_lookahead=True, compresses_prompt=True, compresses_cache=False
    )
    implementation: ClassVar[str] = "spec_rag.methods.specpc:SpecPCMethod"


class _KVConfig(_Config):
    max_capacity_prompt: Annotated[int, Field(gt=0)] = 256
    window_size: Annotated[int, Field(ge=0)] = 32
    kernel_size: Annotated[int, Field(ge=1)] = 7
    pool_type: PoolType = "max"
    reduction_type: ReductionType = "max"

    @model_validator(mode="after")
    def _check_window_and_kernel(self) -> _KVConfig:
        if self.window_size > self.max_capacity_prompt:
            raise ValueError(
                f"window_size ({self.window_size}) is larger than max_capacity_prompt "
                f"({self.max_capacity_prompt}): the last window_size prompt positions are always "
                "kept in the cache, so the budget must hold them. Raise max_capacity_prompt or "
                "lower window_size."
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd for KV selection (got {self.kernel_size}); a centred pool "
                "needs an odd width, e.g. 7."
            )
        return self


class SpecKVConfig(_KVConfig):
    """SpecKV: the draft's approximate answer tells the target which KV entries to keep.

    Args:
        max_capacity_prompt: ``C``, KV entries kept per layer and KV head (paper: 256-1024).
        window_size: ``w``, last prompt positions used as queries and always kept (paper: 32).
        kernel_size: odd width of the pool over scores (paper: 7).
        pool_type / reduction_type: see :class:`SpecPCConfig`.
        lookahead_tokens: ``n``, length of the draft's answer; ``None`` means the request's
            ``max_new_tokens`` (the paper's setting).
        verify_lookahead: open the answer with the lookahead's tokens the target's scoring
            prefill agrees with, plus the target's next token, keeping their KV entries: under
            greedy decoding exactly what full-cache greedy decoding writes, at no extra forward;
            under sampling, tokens drawn as full-cache sampling draws them (the
            speculative-sampling rule for the draft's fixed lookahead: the target's distribution
            is unchanged). An answer from :meth:`~spec_rag.SpecEngine.generate_from` accepts
            them when greedy only (its scoring knows no sampler).
    """

    lookahead_tokens: Annotated[int, Field(ge=0)] | None = None
    verify_lookahead: bool = True

    info: ClassVar[MethodInfo] = MethodInfo(
        "speckv", needs_draft=True, uses_lookahead=True, compresses_prompt=False, compresses_cache=True
    )
    implementation: ClassVar[str] = "spec_rag.methods.speckv:SpecKV"


class SnapKVConfig(_KVConfig):
    """SnapKV baseline: SpecKV's selection with the target's own window and no draft."""

    info: ClassVar[MethodInfo] = MethodInfo(
        "snapkv", needs_draft=False, uses_lookahead=False, compresses_prompt=False, compresses_cache=True
    )
    implementation: ClassVar[str] = "spec_rag.methods.snapkv:SnapKV"


class StreamingLLMConfig(_Config):
    """StreamingLLM baseline: keep ``sink_tokens`` first positions plus the most recent ones."""

    max_capacity_prompt: Annotated[int, Field(gt=0)] = 256
    sink_tokens: Annotated[int, Field(ge=0)] = 4

    @model_validator(mode="after")
    def _sinks_within_budget(self) -> StreamingLLMConfig:
        if self.sink_tokens > self.max_capacity_prompt:
            raise ValueError(
                f"sink_tokens ({self.sink_tokens}) exceeds max_capacity_prompt "
                f"({self.max_capacity_prompt}); lower sink_tokens or raise the budget."
            )
        return self

    info: ClassVar[MethodInfo] = MethodInfo(
        "streamingllm",
        needs_draft=False,
        uses_lookahead=False,
        compresses_prompt=False,
        compresses_cache=True,
    )
    implementation: ClassVar[str] = "spec_rag.methods.streamingllm:StreamingLLM"


def _default_cascade_specpc() -> SpecPCConfig:
    return SpecPCConfig(max_capacity_prompt=2048, kernel_size=32, neighbor_tokens=32)


def _default_cascade_speckv(prompt_budget: int) -> SpecKVConfig:
    """The cache stage's default: half the prompt budget (the ratio measured at 4k, where it
    scored 89.0 against full's 90.0; docs/results.md), kept at least as large as the window."""
    window = SpecKVConfig.model_fields["window_size"].default
    return SpecKVConfig(max_capacity_prompt=max(prompt_budget // 2, window))


class SpecKVPCConfig(_Config):
    """SpecKV-PC: one draft pass cuts the prompt (SpecPC) and then the target's cache (SpecKV).

    The draft prefills the full prompt and writes the lookahead answer; its attention picks the
    prompt tokens the target prefills, and the lookahead guides the target's KV selection.
    Paper defaults: prompt cut to 2048 tokens with kernel/neighbours 32, cache cut to 256-1024;
    here the cache budget defaults to half the prompt budget (1024 for the default 2048).
    """

    specpc: SpecPCConfig = Field(default_factory=_default_cascade_specpc)
    speckv: SpecKVConfig = Field(
        default_factory=lambda data: _default_cascade_speckv(data["specpc"].max_capacity_prompt)
    )

    @model_validator(mode="after")
    def _cache_within_prompt(self) -> SpecKVPCConfig:
        if self.speckv.max_capacity_prompt > self.specpc.max_capacity_prompt:
            raise ValueError(
                f"speckv.max_capacity_prompt ({self.speckv.max_capacity_prompt}) is larger than "
                f"specpc.max_capacity_prompt ({self.specpc.max_capacity_prompt}): the cache cannot "
                "hold more prompt tokens than the compressed prompt has. Lower the cache budget."
            )
        return self

    @property
    def budget(self) -> int:
        return self.speckv.max_capacity_prompt

    def with_budget(self, budget: int) -> SpecKVPCConfig:
        """The same prompt cut with another cache budget."""
        return SpecKVPCConfig(specpc=self.specpc, speckv=self.speckv.with_budget(budget))  # type: ignore[arg-type]

    @classmethod
    def from_fields(cls, method: str, fields: dict[str, Any]) -> SpecKVPCConfig:
        """``max_capacity_prompt`` (and every SpecKV field) sets the cache stage;
        ``prompt_capacity`` the SpecPC budget (default: the paper's 2048)."""
        _check_fields(method, fields, {*SpecKVConfig.model_fields, "prompt_capacity"})
        fields = dict(fields)
        prompt_capacity = fields.pop("prompt_capacity", None)
        pc_fields = {} if prompt_capacity is None else {"max_capacity_prompt": prompt_capacity}
        specpc = SpecPCConfig(**{**_default_cascade_specpc().model_dump(), **pc_fields})
        if "max_capacity_prompt" not in fields:
            cache = _default_cascade_speckv(specpc.max_capacity_prompt)
            fields["max_capacity_prompt"] = cache.max_capacity_prompt
        return cls(specpc=specpc, speckv=SpecKVConfig(**fields))  # type: ignore[arg-type]

    info: ClassVar[MethodInfo] = MethodInfo(
        "speckv-pc", needs_draft=True, uses_lookahead=True, compresses_prompt=True, compresses_cache=True
    )
    implementation: ClassVar[str] = "spec_rag.methods.speckv_pc:SpecKVPC"


_CONFIGS: tuple[type[_Config], ...] = (
    SpecPCConfig,
    SpecKVConfig,
    SpecKVPCConfig,
    SnapKVConfig,
    StreamingLLMConfig,
)
_BY_NAME: dict[str, type[_Config]] = {c.info.name: c for c in _CONFIGS}

EngineConfig = SpecPCConfig | SpecKVConfig | SnapKVConfig | StreamingLLMConfig | SpecKVPCConfig

METHODS = ("full", "specpc", "speckv", "speckv-pc", "snapkv", "streamingllm")
# The LLM wrappers' and ``spec-rag generate``'s method when none is named: SpecKV-PC cuts both the
# prompt and the cache, from one draft pass. At 4k it scored 89.0 (full 90.0, SpecKV 84.3) in
# 0.59x full's time and 0.57x its working memory (docs/results.md).
DEFAULT_METHOD = "speckv-pc"

#: A prefill of more tokens than this runs in chunks of this many (see
#: :func:`spec_rag.generation.forward`): the activations of a pass (queries, attention outputs,
#: residual stream) then cover one chunk, not the whole prompt. ``None`` anywhere it is taken
#: means one pass.
PREFILL_CHUNK_SIZE = 2048


def _key(method: str) -> str:
    key = method.lower().replace("_", "-")
    if key not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return key


def method_info(method: str) -> MethodInfo:
    """The capabilities of a method by name (``"speckv"``, ``"SpecKV_PC"``, ``"full"``, ...)."""
    key = _key(method)
    return FULL if key == "full" else _BY_NAME[key].info


def _check_fields(method: str, fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise InvalidInputError(
            f"method {method!r} takes no {', '.join(unknown)}; its settings are: "
            f"{', '.join(sorted(allowed)) or 'none'}. Leave the others unset."
        )


def config_for_method(method: str, **fields: object) -> EngineConfig | None:
    """Build the config for a method name as users type it (``"speckv"``, ``"full"``, ...).

    ``fields`` are passed to the config; for ``speckv-pc`` a ``max_capacity_prompt`` sets the
    cache budget and ``prompt_capacity`` the SpecPC budget. A field the method does not take
    raises :class:`~spec_rag.errors.InvalidInputError` naming the fields it does take.
    """
    key = _key(method)
    if key == "full":  # full inference has no settings; budgets given for it mean nothing
        return None
    return _BY_NAME[key].from_fields(key, dict(fields))  # type: ignore[return-value]

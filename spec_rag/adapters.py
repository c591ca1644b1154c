"""The framework-free core of the LangChain and LlamaIndex adapters.

Both frameworks get one set of rules from here: where the models come from and how that is
checked, which fields each method takes, the engine built once on first use (thread-safe),
streams handed to asyncio one step per worker thread, token counts and usage figures, and
SpecPC over a list of retrieved documents. The adapter classes only translate their
framework's messages, documents and responses to and from these calls.

Rules, the same for ``ChatSpecKV`` and ``SpecKVLLM``:

- The target is one of ``model`` (a name or path), ``llm`` with ``tokenizer``, or ``engine``;
  none gives the Qwen2.5-Coder 1.5B pack, with the 0.5B pack as its draft.
- The draft is ``draft`` (a name or path) or ``draft_model`` (with ``draft_tokenizer`` when its
  tokenizer is not the target's). A target you name needs its draft named too, for the
  methods that use one (``method_info(name).needs_draft``).
- ``engine=...`` brings the models; method fields given beside it run those models under that
  method (``engine.with_config``).
- ``prompt_capacity`` belongs to ``speckv-pc``, ``lookahead_tokens`` to the methods with a draft
  lookahead; budgets are checked by the method's config, at construction.

And for ``SpecPCCompressor`` and ``SpecPCNodePostprocessor``: the draft is ``draft``,
``draft_model`` with ``draft_tokenizer``, or ``specpc``; none gives the 0.5B pack. Config fields
given beside ``specpc`` or ``config`` override theirs. ``max_capacity_prompt`` counts the
documents' tokens only; the instruction, document headers and question are kept on top.

All four take ``max_input_tokens``, the ceiling on a request's prompt tokens (``None``: none):
a larger request raises :class:`~spec_rag.errors.InputTooLargeError` before any model reads
it. Unset, it is the given ``engine``'s or ``specpc``'s own, else the library's default. The same
holds for ``prefill_chunk_size``: a prefill (the target's, the draft's) longer than it runs in
chunks of that many tokens, which bounds its activations on long prompts (``None``: one pass).
Retrieved text and message contents are untrusted: only the chat template emits control tokens.
A prompt string you templated yourself goes in as :class:`~spec_rag.TrustedPrompt`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Annotated, Any, TypeVar

from pydantic import Field

from spec_rag._prompt import DEFAULT_MAX_INPUT_TOKENS, encode_prompt
from spec_rag.config import (
    DEFAULT_METHOD,
    PREFILL_CHUNK_SIZE,
    EngineConfig,
    SpecPCConfig,
    config_for_method,
    method_info,
)
from spec_rag.engine import Generation, GenerationStream, SpecEngine
from spec_rag.errors import InvalidInputError
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, check_model_source
from spec_rag.specpc import DocumentCompression, SpecPC
from spec_rag.tools import ToolsNotSupportedError, normalize_tools, supports_tools, tool_name

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_MAX_INPUT_TOKENS",
    "DEFAULT_TARGET",
    "PREFILL_CHUNK_SIZE",
    "SAMPLING_FIELDS",
    "SOURCE_NAMES",
    "SPLITTER_DEFAULTS",
    "TOOL_OPTIONS",
    "Budget",
    "Delta",
    "DocumentCompressor",
    "DraftSource",
    "EngineSource",
    "InputCeiling",
    "LazyEngine",
    "Lookahead",
    "MaxNewTokens",
    "PrefillChunk",
    "Temperature",
    "TopK",
    "TopP",
    "Window",
    "assistant_turn",
    "draft_source",
    "engine_source",
    "in_threads",
    "resolve_tool_choice",
    "sampling_options",
    "split_tool_options",
    "tool_options",
    "tool_turn",
    "usage",
    "user_set",
]

logger = logging.getLogger("spec_rag.adapters")


# Field limits, one set for both frameworks (their models are pydantic v2 models).
Budget = Annotated[int, Field(gt=0)]
Window = Annotated[int, Field(ge=0)]
Lookahead = Annotated[int, Field(ge=0)]
MaxNewTokens = Annotated[int, Field(ge=0)]
Temperature = Annotated[float, Field(ge=0.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0)]
InputCeiling = Annotated[int, Field(gt=0)] | None
PrefillChunk = Annotated[int, Field(gt=0)] | None

#: SpecPC settings for text-splitter chunks (about 200 tokens): the paper's 64-token smoothing
#: pool and neighbourhood would each span a third of such a chunk, and blur which sentence of it
#: holds the answer. Used by the compressor and the postprocessor unless given.
SPLITTER_DEFAULTS: dict[str, int] = {"kernel_size": 16, "neighbor_tokens": 16}

# Per-call options and the engine argument each one sets.
_CALL_OPTIONS = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
}

#: The keyword arguments that name an adapter's models, in ``engine_source``'s order.
SOURCE_NAMES = ("model", "llm", "tokenizer", "engine", "draft", "draft_model", "draft_tokenizer")
#: Sampling settings an adapter instance holds under the engine's own names.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")

T = TypeVar("T")
#: ``max_input_tokens`` as an adapter passes it on: a ceiling, ``None`` (none), or ``...`` (unset).
Ceiling = int | None | EllipsisType


def user_set(adapter: Any, name: str) -> Any:
    """An adapter's field ``name`` if the user set it, else ``...`` (unset), so that a given
    ``engine`` or ``specpc`` keeps its own value."""
    return getattr(adapter, name) if name in adapter.model_fields_set else ...


def _ceiling(given: Ceiling, own: int | None = DEFAULT_MAX_INPUT_TOKENS) -> int | None:
    return own if given is ... else given


def check_model_names(*names: str | None) -> None:
    """Where model names given to an adapter are checked at construction (no network).

    Every adapter reaches name checking through this one call: a name that is neither a pack, a
    local path nor a hub id (``org/name``) fails here, offline and at once, with the near match
    (``smollm2-135m`` -> ``smollm2-135m-instruct``); a hub id not in the local hub cache needs
    ``SPEC_RAG_ALLOW_DOWNLOAD=1`` to be fetched on first use.
    """
    for name in names:
        if name is not None:
            check_model_source(name)


# -- the engine of a chat model / LLM -----------------------------------------------------------
@dataclass(frozen=True)
class EngineSource:
    """Where an adapter's engine comes from, checked; nothing is loaded."""

    owner: str
    method: str
    config: EngineConfig | None
    model: str | None = None
    draft: str | None = None
    llm: Any = None
    tokenizer: Any = None
    draft_model: Any = None
    draft_tokenizer: Any = None
    engine: SpecEngine | None = None
    dtype: str = "auto"
    device: str | None = None
    max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS
    prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE


def engine_source(
    owner: str,
    *,
    model: str | None = None,
    llm: Any = None,
    tokenizer: Any = None,
    engine: SpecEngine | None = None,
    draft: str | None = None,
    draft_model: Any = None,
    draft_tokenizer: Any = None,
    method: str | None = None,
    fields: Mapping[str, int | None] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    max_input_tokens: Ceiling = ...,
    prefill_chunk_size: Ceiling = ...,
) -> EngineSource:
    """Check the sources and method fields an adapter was given; ``method=None`` means unset,
    and so does ``...`` for ``max_input_tokens`` and ``prefill_chunk_size``."""
    given: dict[str, int] = {name: value for name, value in (fields or {}).items() if value is not None}
    targets = [
        name for name, value in (("model", model), ("llm", llm), ("engine", engine)) if value is not None
    ]
    if len(targets) > 1:
        raise ValueError(
            f"{owner} takes one target model, got {' and '.join(targets)}: pass model='<name or path>', "
            "or llm=... with tokenizer=..., or engine=SpecEngine(...)."
        )
    if (llm is None) != (tokenizer is None):
        raise ValueError("llm and tokenizer go together: pass both, or model='<name or path>'.")
    if draft is not None and draft_model is not None:
        raise ValueError("pass the draft once: draft='<name or path>' or draft_model=... (not both).")
    if draft_tokenizer is not None and draft_model is None:
        raise ValueError("draft_tokenizer needs draft_model=... (the loaded draft it belongs to).")
    if engine is not None:
        if draft is not None or draft_model is not None:
            raise ValueError(f"engine=... already holds the models: do not also pass a draft to {owner}.")
        limit = _ceiling(max_input_tokens, engine.max_input_tokens)
        chunk = _ceiling(prefill_chunk_size, engine.prefill_chunk_size)
        name, config = engine.method, engine.config
        if method is not None or given:
            name, config = _name(method or engine.method), _method_config(method or engine.method, given)
        own = (engine.max_input_tokens, engine.prefill_chunk_size)
        if config is not engine.config or (limit, chunk) != own:
            models = (engine.target, engine.tokenizer, engine.draft, engine.draft_tokenizer)
            engine = SpecEngine(*models, config, max_input_tokens=limit, prefill_chunk_size=chunk)
        return EngineSource(
            owner, name, config, engine=engine, max_input_tokens=limit, prefill_chunk_size=chunk
        )
    if not targets:
        model = DEFAULT_TARGET
        if draft is None and draft_model is None:
            draft = DEFAULT_DRAFT  # the default pair goes together; a target you name names its draft
    method = _name(method or DEFAULT_METHOD)
    config = _method_config(method, given)
    if method_info(method).needs_draft and draft is None and draft_model is None:
        raise ValueError(
            f"method {method!r} needs a draft model: pass draft='<name or path>' (e.g. {DEFAULT_DRAFT!r}) "
            "or draft_model=...; methods 'snapkv', 'streamingllm' and 'full' need none."
        )
    check_model_names(model, draft)
    return EngineSource(
        owner,
        method,
        config,
        model,
        draft,
        llm,
        tokenizer,
        draft_model,
        draft_tokenizer,
        dtype=dtype,
        device=device,
        max_input_tokens=_ceiling(max_input_tokens),
        prefill_chunk_size=_ceiling(prefill_chunk_size, PREFILL_CHUNK_SIZE),
    )


def _name(method: str) -> str:
    return method.lower().replace("_", "-")


def _method_config(method: str, fields: Mapping[str, int]) -> EngineConfig | None:
    info = method_info(method)  # an unknown name fails here, with the list of methods
    method = _name(method)
    if "prompt_capacity" in fields and method != "speckv-pc":
        raise ValueError(
            f"prompt_capacity is the SpecPC budget of method 'speckv-pc'; method {method!r} has no "
            "such step. Use max_capacity_prompt instead."
        )
    if "lookahead_tokens" in fields and not info.uses_lookahead:
        raise ValueError(
            f"lookahead_tokens is the draft's lookahead; method {method!r} has no draft lookahead. "
            "Leave it unset."
        )
    return config_for_method(method, **fields)


@dataclass(frozen=True)
class Delta:
    """One chunk of a stream: its text, and on the last chunk the finished generation."""

    text: str
    generation: Generation | None = None


class LazyEngine:
    """The engine of one adapter instance, built on first use (once, even across threads).

    Models given by name come from ``spec_rag.get_model``'s process-wide cache, so adapters
    naming the same models share one copy.
    """

    def __init__(self, source: EngineSource) -> None:
        self.source = source
        self._engine = source.engine
        self._lock = threading.Lock()
        self._tools: bool | None = None  # whether the chat template renders tools, once asked

    @property
    def loaded(self) -> SpecEngine | None:
        """The engine if it is built (no loading)."""
        return self._engine

    def get(self) -> SpecEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._build()
        return self._engine

    def _build(self) -> SpecEngine:
        from spec_rag.models import get_model  # imported on first use: it is heavy

        s = self.source
        target, tokenizer = s.llm, s.tokenizer
        if target is None:
            assert s.model is not None  # checked by engine_source
            target, tokenizer = get_model(s.model, dtype=s.dtype, device=s.device)
        draft, draft_tokenizer = s.draft_model, s.draft_tokenizer
        if not method_info(s.method).needs_draft:
            draft = draft_tokenizer = None
        elif draft is None:
            assert s.draft is not None  # checked by engine_source
            draft, draft_tokenizer = get_model(s.draft, dtype=s.dtype, device=s.device)
        return SpecEngine(
            target,
            tokenizer,
            draft,
            draft_tokenizer,
            s.config,
            max_input_tokens=s.max_input_tokens,
            prefill_chunk_size=s.prefill_chunk_size,
        )

    def target(self) -> Any:
        """The target model if it is at hand without loading, else None."""
        return self._engine.target if self._engine is not None else self.source.llm

    def model_name(self) -> str:
        """The target's name: the one given, or the loaded model's ``name_or_path``."""
        if self.source.model is not None:
            return self.source.model
        target = self.target()
        config = getattr(target, "config", None)
        name = getattr(target, "spec_rag_name", None) or getattr(config, "name_or_path", None)
        return str(name or "spec-rag-local")

    def tokenizer(self) -> Any:
        """The target's tokenizer (loads the models on first use when they were given by name)."""
        return self.source.tokenizer if self.source.tokenizer is not None else self.get().tokenizer

    def tokenizer_at_hand(self) -> Any:
        """The target's tokenizer without loading a model: the one given or already loaded, or
        one read from the target's local files (a fetched pack, a directory, a hub-cache copy);
        ``None`` when only loading the model would give it."""
        if self._engine is not None or self.source.tokenizer is not None:
            return self.tokenizer()
        if self.source.model is None:
            return None
        from transformers import AutoTokenizer

        from spec_rag.models import MARKER_FILE
        from spec_rag.models.loading import resolve_model_source
        from spec_rag.models.packs import pack_dir

        source = resolve_model_source(self.source.model)
        directory = {"pack": pack_dir(source.location), "dir": Path(source.location)}.get(
            source.kind, source.snapshot
        )
        local = directory is not None and (source.kind != "pack" or (directory / MARKER_FILE).is_file())
        return AutoTokenizer.from_pretrained(str(directory)) if local else None

    def supports_tools(self) -> bool:
        """Whether the target's chat template renders tools: asked of :meth:`tokenizer_at_hand`,
        else of the loaded target (the models load)."""
        if self._tools is None:
            tokenizer = self.tokenizer_at_hand()
            self._tools = supports_tools(tokenizer if tokenizer is not None else self.tokenizer())
        return self._tools

    def check_tools(self, *, load: bool = True) -> None:
        """Raise :class:`~spec_rag.tools.ToolsNotSupportedError` when the target's chat template
        cannot render tools. ``load=False`` checks only when no model has to load for it (the
        engine checks again at the first call)."""
        if not load and self._tools is None and self.tokenizer_at_hand() is None:
            return
        if not self.supports_tools():
            raise ToolsNotSupportedError(
                f"{self.source.owner}: the chat template of {self.model_name()!r} has no tool support, "
                "so it cannot be given tools. Use a target whose template renders tools (e.g. the "
                f"Qwen2.5-Coder pair: {DEFAULT_TARGET!r} with {DEFAULT_DRAFT!r} as its draft), or ask "
                "for a JSON answer instead (structured output through a JSON schema needs no tools)."
            )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` under the target's tokenizer (no special tokens added)."""
        return list(self.tokenizer().encode(text, add_special_tokens=False))

    def count_tokens(
        self, prompt: str | Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> int:
        """Tokens the target reads for ``prompt``: a text as-is, chat messages through the chat
        template (with ``tools``, if any) and the assistant's turn opened, as the engine feeds
        them."""
        if isinstance(prompt, str):
            return len(self.tokenize(prompt)) if prompt else 0
        if not prompt:
            return 0
        messages = [dict(m) for m in prompt]
        encoded = encode_prompt(self.tokenizer(), messages, max_tokens=None, tools=tools)
        return int(encoded["input_ids"].numel())

    def _check(self, prompt: str | list[dict[str, Any]]) -> None:
        if not isinstance(prompt, str) and len(prompt) == 0:
            raise InvalidInputError(
                f"{self.source.owner} got no messages; pass at least one chat message (or a text) to answer."
            )

    def generate(self, prompt: str | list[dict[str, Any]], options: Mapping[str, Any]) -> Generation:
        self._check(prompt)
        generation = self.get().generate(prompt, **options)
        assert isinstance(generation, Generation)
        return generation

    def stream(self, prompt: str | list[dict[str, Any]], options: Mapping[str, Any]) -> Iterator[Delta]:
        """The answer as deltas; the last one carries the finished generation (and the last text).

        The prompt is checked and the models loaded here, before the first ``next``. Each delta
        is handed on when the next one is ready, so the last text and the usage arrive together.
        """
        self._check(prompt)
        return _deltas(self.get().stream(prompt, **options))


def _deltas(stream: GenerationStream) -> Iterator[Delta]:
    try:
        held: str | None = None
        for text in stream:
            if held is not None:
                yield Delta(held)
            held = text
        assert stream.generation is not None
        yield Delta(held or "", stream.generation)
    finally:
        stream.close()  # stops the decode loop when the consumer leaves early


def sampling_options(owner: str, defaults: Mapping[str, Any], call: Mapping[str, Any]) -> dict[str, Any]:
    """Engine sampling arguments: the instance's ``defaults``, overridden by per-call options
    (``max_tokens`` is an alias of ``max_new_tokens``). An unknown option is an error."""
    unknown = sorted(set(call) - set(_CALL_OPTIONS))
    if unknown:
        raise ValueError(
            f"{owner} got unsupported call options {unknown}; supported: {sorted(_CALL_OPTIONS)}."
        )
    options = dict(defaults)
    for key, value in call.items():
        if value is not None:
            options[_CALL_OPTIONS[key]] = value
    stop = options.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    options["stop"] = list(dict.fromkeys(stops)) or None
    return options


def usage(generation: Generation) -> dict[str, int]:
    """``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` of a generation."""
    prompt_tokens, completion_tokens = generation.stats.prompt_tokens, generation.stats.output_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- tool calling and structured output ------------------------------------------------------
#: Per-call options that go to the engine as they are, beside the sampling ones: the tools the
#: chat template renders, which call the grammar forces, and the JSON schema of the answer.
TOOL_OPTIONS = ("tools", "tool_choice", "response_format")

_CHOICE_ALIASES = {"auto": "auto", "none": "none", "required": "required", "any": "required"}


def split_tool_options(call: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``call``'s options as (sampling options, engine tool options); ``None`` values are dropped
    from the tool options, so an unset one keeps the engine's default."""
    rest = {key: value for key, value in call.items() if key not in TOOL_OPTIONS}
    tools = {key: call[key] for key in TOOL_OPTIONS if call.get(key) is not None}
    return rest, tools


def resolve_tool_choice(
    owner: str, choice: Any, names: Sequence[str], *, required: bool = False
) -> str | None:
    """The engine's ``tool_choice`` for a framework's: ``None`` (``"required"`` when ``required``,
    else the model's choice), ``"auto"``, ``"none"``, ``"required"`` / ``"any"`` / ``True``, a
    tool's name, or an OpenAI-style ``{"type": "function", "function": {"name": ...}}`` (or
    ``{"name": ...}``). A name must be one of ``names``."""
    if choice is None or choice is False:
        return "required" if required else None
    if choice is True:
        return "required"
    name: Any = choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(
            f"{owner} got tool_choice={choice!r}; pass 'auto', 'none', 'required' (or 'any'), a tool's "
            "name, or {'type': 'function', 'function': {'name': ...}}."
        )
    if isinstance(choice, str) and choice.lower() in _CHOICE_ALIASES:
        return _CHOICE_ALIASES[choice.lower()]
    if name not in names:
        raise InvalidInputError(
            f"{owner} got tool_choice={name!r}, which is not one of the tools given "
            f"({', '.join(names) or 'none'}); name one of them, or pass 'auto' or 'required'."
        )
    return name


async def in_threads(items: Iterator[T]) -> AsyncIterator[T]:
    """``items`` stepped from worker threads, one step at a time, so the event loop stays free
    while the model decodes; closing it closes ``items`` (in a thread, after any running step)."""
    lock = threading.Lock()
    done = object()

    def step() -> Any:
        with lock:
            return next(items, done)

    def close() -> None:
        with lock:
            getattr(items, "close", lambda: None)()

    try:
        while (item := await asyncio.to_thread(step)) is not done:
            yield item
    finally:
        await asyncio.to_thread(close)


# -- SpecPC over retrieved documents ----------------------------------------------------------
@dataclass(frozen=True)
class DraftSource:
    """Where a document compressor's draft comes from, and its SpecPC config; nothing loaded."""

    owner: str
    config: SpecPCConfig
    draft: str | None = None
    draft_model: Any = None
    draft_tokenizer: Any = None
    specpc: SpecPC | None = None
    dtype: str = "auto"
    device: str | None = None
    max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS
    target_tokenizer: Any = None  # a name or path, or a tokenizer object; None: the draft's
    prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE


def draft_source(
    owner: str,
    *,
    draft: str | None = None,
    draft_model: Any = None,
    draft_tokenizer: Any = None,
    specpc: SpecPC | None = None,
    config: SpecPCConfig | None = None,
    fields: Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    max_input_tokens: Ceiling = ...,
    target_tokenizer: Any = None,
    prefill_chunk_size: Ceiling = ...,
) -> DraftSource:
    """Check a document compressor's draft and build its config (``fields`` over ``config``,
    over ``specpc``'s config, over SpecPC's defaults with :data:`SPLITTER_DEFAULTS`).

    ``target_tokenizer`` (the served model's tokenizer: a name or path that
    :func:`spec_rag.models.load_tokenizer` loads, or a tokenizer object) makes the budget count
    the documents' tokens in it; a name is checked now and loaded on first use."""
    given = [
        n for n, v in (("draft", draft), ("draft_model", draft_model), ("specpc", specpc)) if v is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"{owner} takes one draft, got {' and '.join(given)}: pass draft='<name or path>', "
            "or draft_model=... with draft_tokenizer=..., or specpc=SpecPC(...)."
        )
    if (draft_model is None) != (draft_tokenizer is None):
        raise ValueError("draft_model and draft_tokenizer go together: pass both, or draft='<name or path>'.")
    if not given:
        draft = DEFAULT_DRAFT
    if config is not None and specpc is not None:
        raise ValueError("specpc=... brings its own SpecPCConfig; pass config=... or specpc=..., not both.")
    base = config or (specpc.config if specpc is not None else SpecPCConfig(**SPLITTER_DEFAULTS))
    update = {name: value for name, value in (fields or {}).items() if value is not None}
    resolved = SpecPCConfig(**{**base.model_dump(), **update})  # validated: a bad mix fails now
    if isinstance(target_tokenizer, str):
        check_model_names(draft, target_tokenizer)
    elif target_tokenizer is not None and not callable(target_tokenizer):
        raise ValueError(
            f"{owner}'s target_tokenizer must be a model name or path, or a tokenizer object "
            f"(got {type(target_tokenizer).__name__})."
        )
    else:
        check_model_names(draft)
    limit: int | None = DEFAULT_MAX_INPUT_TOKENS
    chunk: int | None = PREFILL_CHUNK_SIZE
    if specpc is not None:
        limit, chunk = specpc.max_input_tokens, specpc.prefill_chunk_size
    limit, chunk = _ceiling(max_input_tokens, limit), _ceiling(prefill_chunk_size, chunk)
    return DraftSource(
        owner,
        resolved,
        draft,
        draft_model,
        draft_tokenizer,
        specpc,
        dtype,
        device,
        limit,
        target_tokenizer,
        prefill_chunk_size=chunk,
    )


class DocumentCompressor:
    """SpecPC over retrieved documents for one adapter instance; the draft loads on first use.

    Empty and whitespace-only documents take no budget and come back with ``kept_tokens == 0``.
    Logs one warning per instance when a document with text is dropped entirely.
    """

    def __init__(self, source: DraftSource) -> None:
        self.source = source
        self._specpc: SpecPC | None = None
        self._target_tokenizer: Any = None
        self._lock = threading.Lock()
        self._warned = False

    def get(self) -> SpecPC:
        if self._specpc is None:
            with self._lock:
                if self._specpc is None:
                    self._specpc = self._build()
        return self._specpc

    def _build(self) -> SpecPC:
        s = self.source
        options = {"max_input_tokens": s.max_input_tokens, "prefill_chunk_size": s.prefill_chunk_size}
        if s.specpc is not None:
            own = {name: getattr(s.specpc, name) for name in options}
            if s.specpc.config == s.config and own == options:
                return s.specpc
            return SpecPC(s.specpc.model, s.specpc.tokenizer, s.config, **options)
        model, tokenizer = s.draft_model, s.draft_tokenizer
        if model is None:
            from spec_rag.models import get_model  # imported on first use: it is heavy

            assert s.draft is not None  # checked by draft_source
            model, tokenizer = get_model(s.draft, dtype=s.dtype, device=s.device)
        return SpecPC(model, tokenizer, s.config, **options)

    def target_tokenizer(self) -> Any:
        """The tokenizer the budget counts in (``None``: the draft's), loaded on first use."""
        given = self.source.target_tokenizer
        if not isinstance(given, str):
            return given
        if self._target_tokenizer is None:
            with self._lock:
                if self._target_tokenizer is None:
                    from spec_rag.models import load_tokenizer  # imported on first use: it is heavy

                    self._target_tokenizer = load_tokenizer(given)
        return self._target_tokenizer

    def compress(
        self, query: str | None, texts: Sequence[str], *, budget: int, instruction: str | None = None
    ) -> list[DocumentCompression]:
        """What SpecPC keeps of each text for ``query``, the texts sharing ``budget`` tokens
        (counted in the target tokenizer when the source names one, else in the draft's)."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError(
                f"{self.source.owner} got an empty query; it needs the query, since SpecPC keeps what the "
                "documents say about it. Pass the user's question."
            )
        if not texts:
            return []
        options: dict[str, Any] = {"max_document_tokens": budget, "target_tokenizer": self.target_tokenizer()}
        if instruction is not None:
            options["instruction"] = instruction
        parts = self.get().compress_documents(query, list(texts), **options)
        dropped = sum(1 for part in parts if part.original_tokens > 0 and part.kept_tokens == 0)
        if dropped and not self._warned:
            self._warned = True
            logger.warning(
                "%s dropped %d of %d documents entirely: max_capacity_prompt=%d document tokens went "
                "to the documents the draft found more relevant. Raise max_capacity_prompt to keep "
                "part of every document (this warning is logged once per instance).",
                self.source.owner,
                dropped,
                len(parts),
                budget,
            )
        return parts


# -- tool calling and structured output ---------------------------------------------------------
def tool_options(
    owner: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    choice: Any = None,
    response_format: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The engine's ``tools`` / ``tool_choice`` / ``response_format`` arguments of one call
    (only those that are set), checked."""
    options: dict[str, Any] = {}
    normalized = normalize_tools(tools) if tools else []
    if normalized:
        options["tools"] = normalized
    forced = resolve_tool_choice(owner, choice, [tool_name(tool) for tool in normalized])
    if forced not in (None, "auto"):
        options["tool_choice"] = forced
    if response_format is not None:
        if forced in (None, "auto", "none"):
            options["response_format"] = response_format
        else:
            raise InvalidInputError(
                f"{owner} got response_format with tool_choice={choice!r}: a forced tool call is "
                "already structured. Pass one of the two."
            )
    return options


def assistant_turn(text: str, calls: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """An assistant message for the chat template: its text and its tool calls, each given as
    ``(id, name, arguments)`` with the arguments a dict (or its JSON text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": _arguments(args)}}
            for call_id, name, args in calls
        ]
    return message


def tool_turn(text: str, tool_call_id: str | None, name: str | None = None) -> dict[str, Any]:
    """A tool's result for the chat template (role ``tool``)."""
    message: dict[str, Any] = {"role": "tool", "content": text}
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if name:
        message["name"] = name
    return message


def _arguments(args: Any) -> dict[str, Any]:
    # Templates render the arguments with `tojson`: a JSON string would be quoted twice.
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"a tool call's arguments are not JSON: {args!r} ({err}).") from err
    if not isinstance(args, Mapping):
        raise InvalidInputError(f"a tool call's arguments must be a JSON object; got {args!r}.")
    return dict(args)

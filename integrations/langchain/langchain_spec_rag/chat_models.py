"""ChatSpecKV: a local Hugging Face chat model served by spec-rag's SpecEngine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from spec_rag import Generation, SpecEngine, config_for_method

_NEEDS_DRAFT = ("speckv", "specpc", "speckv-pc")
_ROLES = {"system": "system", "developer": "system", "human": "user", "ai": "assistant"}
# Per-call options (``model.invoke(..., max_tokens=8)``) and the engine argument each one sets.
_CALL_OPTIONS = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
}


_LOOKAHEAD_METHODS = ("speckv", "speckv-pc", "specpc")


class ChatSpecKV(BaseChatModel):
    """A local chat model whose long prompts are served with draft-based approximate inference.

    A small draft model guides the target: ``"speckv"`` keeps the target's KV entries that the
    draft's approximate answer attends to, ``"specpc"`` shortens the prompt itself, and
    ``"speckv-pc"`` does both. ``"snapkv"``, ``"streamingllm"`` and ``"full"`` are the
    baselines. Models are loaded on first use through spec-rag's shared cache, so many
    instances with the same names share one copy in memory.

    Give the target one of three ways:
        model: a name or path for ``spec_rag.get_model`` (e.g. ``"qwen2.5-coder-1.5b-instruct"``).
        llm / tokenizer: an already loaded Hugging Face causal LM and its tokenizer.
        engine: a ready ``spec_rag.SpecEngine`` (its method and budgets are used as they are).

    and the draft (needed by speckv, specpc and speckv-pc) as ``draft`` (name or path) or
    ``draft_model`` / ``draft_tokenizer``.

    Args:
        method: ``"speckv"`` (default), ``"specpc"``, ``"speckv-pc"``, ``"snapkv"``,
            ``"streamingllm"`` or ``"full"``.
        max_capacity_prompt: prompt KV entries kept per head (``"specpc"``: prompt tokens kept);
            ``None`` keeps the method's default.
        window_size: last prompt tokens used as scoring queries and always kept.
        prompt_capacity: ``"speckv-pc"`` only, the budget of its SpecPC step.
        lookahead_tokens: tokens the draft writes ahead for scoring (``"speckv"`` and
            ``"speckv-pc"``: ``None`` writes as many as the answer may have; ``"specpc"``:
            ``None`` keeps SpecPC's default).
        max_tokens: most tokens to generate (alias ``max_new_tokens``).
        temperature / top_p / top_k / seed: sampling (temperature 0 is greedy).
        stop: strings that end the answer; merged with the ``stop`` of each call.
        streaming: make ``invoke`` stream internally (callbacks see tokens as they come).
        dtype / device: how models given by name are loaded.
        timeout, max_retries, api_key: accepted for drop-in compatibility and ignored; the
            model runs in this process.

    Tool calling, structured output and non-text inputs are not supported.

    Example:
        .. code-block:: python

            from langchain_spec_rag import ChatSpecKV

            llm = ChatSpecKV(
                model="qwen2.5-coder-1.5b-instruct",
                draft="qwen2.5-coder-0.5b-instruct",
                method="speckv",
                max_capacity_prompt=256,
            )
            answer = llm.invoke("Summarise the document above.")
            answer.response_metadata["spec_rag"]["kv_cache_tokens"]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = None
    llm: Any = Field(default=None, exclude=True, repr=False)
    tokenizer: Any = Field(default=None, exclude=True, repr=False)
    engine: SpecEngine | None = Field(default=None, exclude=True, repr=False)
    draft: str | None = None
    draft_model: Any = Field(default=None, exclude=True, repr=False)
    draft_tokenizer: Any = Field(default=None, exclude=True, repr=False)

    method: str = "speckv"
    max_capacity_prompt: int | None = None
    window_size: int | None = None
    prompt_capacity: int | None = None
    lookahead_tokens: int | None = Field(default=None, ge=0)

    max_tokens: int = Field(default=256, ge=0, alias="max_new_tokens")
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    streaming: bool = False
    dtype: str = "bfloat16"
    device: str | None = None

    timeout: float | None = None
    max_retries: int | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    _engine: SpecEngine | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- construction (cheap: nothing is loaded here) ------------------------------------------
    @model_validator(mode="after")
    def _check_sources(self) -> ChatSpecKV:
        targets = [
            n for n, v in (("model", self.model), ("llm", self.llm), ("engine", self.engine)) if v is not None
        ]
        if len(targets) != 1:
            found = f"got {' and '.join(targets)}" if targets else "got none"
            raise ValueError(
                f"ChatSpecKV needs exactly one target model ({found}): pass model='<name or path>' "
                "(e.g. 'qwen2.5-coder-1.5b-instruct'), or llm=... with tokenizer=..., "
                "or engine=SpecEngine(...)."
            )
        if (self.llm is None) != (self.tokenizer is None):
            raise ValueError("llm and tokenizer go together: pass both, or model='<name>'.")
        if (self.draft_model is None) != (self.draft_tokenizer is None):
            raise ValueError("draft_model and draft_tokenizer go together: pass both, or draft='<name>'.")
        if self.draft is not None and self.draft_model is not None:
            raise ValueError(
                "pass the draft once: draft='<name>' or draft_model=... with draft_tokenizer=...."
            )
        if self.engine is not None:
            given = {
                "method",
                "max_capacity_prompt",
                "window_size",
                "prompt_capacity",
                "lookahead_tokens",
                "draft",
                "draft_model",
            }
            clash = sorted(given & self.model_fields_set)
            if clash:
                raise ValueError(
                    "engine=... already fixes the models and the method; do not also pass "
                    f"{', '.join(clash)}. Use engine.with_config(...) to change the method or budget."
                )
            self.method = self.engine.method
            return self
        self.method = self.method.lower().replace("_", "-")
        if self.prompt_capacity is not None and self.method != "speckv-pc":
            raise ValueError(
                f"prompt_capacity is the SpecPC budget of method 'speckv-pc'; method {self.method!r} "
                "has no such step. Use max_capacity_prompt instead."
            )
        if self.lookahead_tokens is not None and self.method not in _LOOKAHEAD_METHODS:
            raise ValueError(
                f"lookahead_tokens is the draft's lookahead of {', '.join(_LOOKAHEAD_METHODS)}; "
                f"method {self.method!r} has no draft lookahead. Leave it unset."
            )
        self._method_config()  # validates the method name and budgets now, not at first use
        if self.method in _NEEDS_DRAFT and self.draft is None and self.draft_model is None:
            raise ValueError(
                f"method {self.method!r} needs a draft model: pass draft='<name or path>' "
                "(e.g. 'qwen2.5-coder-0.5b-instruct') or draft_model=... with draft_tokenizer=...; "
                "methods 'snapkv', 'streamingllm' and 'full' need none."
            )
        return self

    def _method_config(self) -> Any:
        fields = {
            name: value
            for name, value in (
                ("max_capacity_prompt", self.max_capacity_prompt),
                ("window_size", self.window_size),
                ("prompt_capacity", self.prompt_capacity),
                ("lookahead_tokens", self.lookahead_tokens),
            )
            if value is not None
        }
        return config_for_method(self.method, **fields)

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            open_weights=True,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            tool_calling=False,
            tool_choice=False,
        )

    # -- the engine (built on first use; one per instance, models shared process-wide) -------
    def _get_engine(self) -> SpecEngine:
        if self._engine is not None:
            return self._engine
        with self._lock:
            if self._engine is None:
                self._engine = self._build_engine()
            return self._engine

    def _build_engine(self) -> SpecEngine:
        if self.engine is not None:
            return self.engine
        config = self._method_config()
        uses_draft = self.method in _NEEDS_DRAFT
        if self.model is not None and (self.draft is not None or not uses_draft):
            return SpecEngine.from_pretrained(
                self.model, self.draft if uses_draft else None, config, dtype=self.dtype, device=self.device
            )
        from spec_rag.models import get_model  # imported on first use: it is heavy

        target, tokenizer = self.llm, self.tokenizer
        if target is None:
            assert self.model is not None  # checked at construction
            target, tokenizer = get_model(self.model, dtype=self.dtype, device=self.device)
        draft, draft_tokenizer = self.draft_model, self.draft_tokenizer
        if uses_draft and draft is None and self.draft is not None:
            draft, draft_tokenizer = get_model(self.draft, dtype=self.dtype, device=self.device)
        if not uses_draft:
            draft = draft_tokenizer = None
        return SpecEngine(target, tokenizer, draft, draft_tokenizer, config)

    @property
    def model_name(self) -> str:
        """The target's name: ``model``, or the loaded model's ``name_or_path``."""
        if self.model is not None:
            return self.model
        target = self.engine.target if self.engine is not None else self.llm
        name = getattr(getattr(target, "config", None), "name_or_path", "") or ""
        return str(name) or "spec-rag-local"

    # -- LangChain plumbing ---------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "spec-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "draft": self.draft,
            "method": self.method,
            "max_capacity_prompt": self.max_capacity_prompt,
            "window_size": self.window_size,
            "prompt_capacity": self.prompt_capacity,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "dtype": self.dtype,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="spec_rag",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        raise NotImplementedError(
            "ChatSpecKV does not support tool calling: it runs a local model through a plain chat "
            "template. Use a tool-calling chat model for agents, and ChatSpecKV for answering over "
            "long retrieved context."
        )

    # -- generation -----------------------------------------------------------------------------
    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Chat messages for the engine, and its generation options (instance + per call)."""
        options: dict[str, Any] = {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "seed": self.seed,
        }
        override = kwargs.pop("model", None)
        if override is not None and override != self.model_name:
            raise ValueError(
                f"ChatSpecKV runs the local model {self.model_name!r} and cannot switch to {override!r} "
                "per call; create another ChatSpecKV(model=...) (loaded models are shared)."
            )
        kwargs.pop("stream", None)  # set by LangChain's streaming plumbing, not a model option
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS))
        if unknown:
            raise ValueError(
                f"ChatSpecKV got unsupported call options {unknown}; supported: {sorted(_CALL_OPTIONS)}, "
                "and stop."
            )
        for key, value in kwargs.items():
            if value is not None:
                options[_CALL_OPTIONS[key]] = value
        stops = list(dict.fromkeys([*(self.stop or []), *(stop or [])]))
        options["stop"] = stops or None
        return _to_chat(messages), options

    def _metadata(self, generation: Generation) -> tuple[UsageMetadata, dict[str, Any]]:
        stats = generation.stats
        usage = UsageMetadata(
            input_tokens=stats.prompt_tokens,
            output_tokens=stats.output_tokens,
            total_tokens=stats.prompt_tokens + stats.output_tokens,
        )
        response = {
            "model_name": self.model_name,
            "finish_reason": generation.finish_reason,
            "spec_rag": stats.to_dict(),
        }
        return usage, response

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat, options = self._request(messages, stop, kwargs)
        generation = self._get_engine().generate(chat, **options)
        assert isinstance(generation, Generation)
        usage, response = self._metadata(generation)
        message = AIMessage(content=generation.text, usage_metadata=usage, response_metadata=response)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chat, options = self._request(messages, stop, kwargs)
        stream = self._get_engine().stream(chat, **options)
        try:
            for delta in stream:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        finally:
            stream.close()  # stops the decode loop when the consumer leaves early
        assert stream.generation is not None
        usage, response = self._metadata(stream.generation)
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage, response_metadata=response, chunk_position="last"
            )
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Decoding is CPU/GPU work in this process: each step runs in a worker thread so the
        # event loop stays free. The lock keeps close() from racing a step still running.
        chunks = _ThreadedIterator(self._stream(messages, stop=stop, **kwargs))
        try:
            while True:
                chunk = await asyncio.to_thread(chunks.next)
                if chunk is None:
                    break
                last = isinstance(chunk.message, AIMessageChunk) and chunk.message.chunk_position == "last"
                if run_manager and not last:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await asyncio.to_thread(chunks.close)


class _ThreadedIterator:
    """A generator stepped from worker threads, one step at a time; ``next`` gives None at the end."""

    def __init__(self, iterator: Iterator[ChatGenerationChunk]) -> None:
        self._iterator = iterator
        self._lock = threading.Lock()

    def next(self) -> ChatGenerationChunk | None:
        with self._lock:
            return next(self._iterator, None)

    def close(self) -> None:
        with self._lock:
            close: Callable[[], None] | None = getattr(self._iterator, "close", None)
            if close is not None:
                close()


def _to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the tokenizer's chat template."""
    chat = []
    for message in messages:
        if isinstance(message, ChatMessage):
            role = message.role
        elif message.type in _ROLES:
            role = _ROLES[message.type]
        else:
            raise ValueError(
                f"ChatSpecKV cannot take a {type(message).__name__}: it supports system, human, ai and "
                "chat messages (no tool calling)."
            )
        if isinstance(message, AIMessage) and message.tool_calls:
            raise ValueError("ChatSpecKV does not support tool calling; drop the AI message's tool_calls.")
        chat.append({"role": role, "content": _text(message)})
    return chat


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatSpecKV takes text only; got a {kind!r} content block.")
    return "".join(parts)

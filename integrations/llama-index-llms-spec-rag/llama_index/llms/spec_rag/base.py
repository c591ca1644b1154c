"""A local Hugging Face model as a LlamaIndex LLM, answering under SpecKV (or any spec-rag method).

The target model writes the answer; a small draft model first writes an approximate answer
whose attention tells the target which prompt KV entries to keep, so long RAG prompts decode
from a small cache. The model work lives in :class:`spec_rag.SpecEngine`; this module only
translates LlamaIndex prompts and chat messages to engine requests and engine results back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt

from spec_rag import (
    Generation,
    GenerationStream,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    config_for_method,
)
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, get_model

#: Reported as ``metadata.context_window`` until the target is loaded (SmolLM2's window; the
#: Qwen2.5 pair has 32k). Pass ``context_window=`` to pin it.
DEFAULT_CONTEXT_WINDOW = 8192

_NEEDS_DRAFT = (SpecPCConfig, SpecKVConfig, SpecKVPCConfig)
_ROLE_NAMES = {
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.DEVELOPER: "system",
}
_METHOD_FIELDS = ("method", "max_capacity_prompt", "window_size", "prompt_capacity", "lookahead_tokens")
_LOOKAHEAD_METHODS = ("speckv", "speckv-pc", "specpc")

Prompt = str | list[dict[str, Any]]


class SpecKVLLM(CustomLLM):
    """A local causal LM with draft-guided KV-cache compression, for LlamaIndex.

    Give the target one of three ways:

    - ``model="qwen2.5-coder-1.5b-instruct"`` (default): a spec-rag model pack, a local
      directory or a hub id, loaded on first use and shared process-wide;
    - ``llm=..., tokenizer=...``: a loaded Hugging Face causal LM and its tokenizer;
    - ``engine=SpecEngine(...)``: a ready engine (its models and method).

    The draft comes the same way: ``draft=<name or path>`` or ``draft_model=...`` (with
    ``draft_tokenizer=...`` when its tokenizer differs from the target's); it is only loaded for
    methods that use it. With the default target the draft defaults to Qwen2.5-Coder-0.5B.

    ``method`` is ``"speckv"`` (default), ``"specpc"``, ``"speckv-pc"``, ``"snapkv"``,
    ``"streamingllm"`` or ``"full"``; ``max_capacity_prompt`` is its budget (KV entries kept
    per head, or prompt tokens for SpecPC), ``prompt_capacity`` SpecKV-PC's prompt budget.
    ``None`` keeps the method's default.

    Chat messages go through the target's chat template. ``complete(prompt)`` sends the prompt
    as a user message (after ``system_prompt``); ``complete(prompt, formatted=True)`` feeds it
    to the model as-is. Responses carry the token usage in ``raw["usage"]`` and the engine's
    statistics (method, prompt and cache sizes, timings) in ``raw["spec_rag"]``.

    Example:
        >>> llm = SpecKVLLM(model="smollm2-135m-instruct", draft="smollm2-135m-instruct")
        >>> llm.complete("What is the capital of France?").text  # doctest: +SKIP
    """

    model: str | None = Field(
        default=DEFAULT_TARGET, description="Target model: a spec-rag pack name, a local path or a hub id."
    )
    draft: str | None = Field(
        default=None,
        description="Draft model: a spec-rag pack name, a local path or a hub id (default: the Qwen2.5-Coder "
        "0.5B pack when the target is the default Qwen2.5-Coder 1.5B).",
    )
    method: str = Field(
        default="speckv", description="full, specpc, speckv, speckv-pc, snapkv or streamingllm."
    )
    max_capacity_prompt: int | None = Field(
        default=None, gt=0, description="The method's budget (None: its default)."
    )
    window_size: int | None = Field(default=None, ge=0, description="Last prompt positions always kept.")
    prompt_capacity: int | None = Field(default=None, gt=0, description="SpecKV-PC's prompt budget.")
    lookahead_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Tokens the draft writes ahead for scoring (speckv, speckv-pc: None writes as many "
        "as the answer may have; specpc: None keeps its default).",
    )
    max_new_tokens: int = Field(default=256, gt=0, description="Most tokens generated per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k most likely tokens (0: all).")
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible sampled answers.")
    stop: list[str] | None = Field(default=None, description="Strings that end an answer (not included).")
    context_window: int | None = Field(
        default=None, gt=0, description="Context window reported to LlamaIndex (None: the target's)."
    )
    dtype: str = Field(default="bfloat16", description="dtype the models are loaded in (by name).")
    device: str | None = Field(default=None, description="Device the models are loaded on (default CPU).")

    _engine: SpecEngine | None = PrivateAttr(default=None)
    _target: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _draft_model: Any = PrivateAttr(default=None)
    _draft_tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        model: str | None = None,
        draft: str | None = None,
        *,
        llm: Any = None,
        tokenizer: Any = None,
        draft_model: Any = None,
        draft_tokenizer: Any = None,
        engine: SpecEngine | None = None,
        **kwargs: Any,
    ) -> None:
        if engine is not None and any(x is not None for x in (model, draft, llm, tokenizer, draft_model)):
            raise ValueError(
                "engine=... already holds the models: do not pass model, draft, llm or draft_model."
            )
        if model is not None and llm is not None:
            raise ValueError(
                "pass the target once: either model=<name or path> or llm=... with tokenizer=...."
            )
        if (llm is None) != (tokenizer is None):
            raise ValueError("llm and tokenizer go together: pass both (or model=<name or path>).")
        if draft is not None and draft_model is not None:
            raise ValueError("pass the draft once: either draft=<name or path> or draft_model=....")
        if draft_tokenizer is not None and draft_model is None:
            raise ValueError("draft_tokenizer needs draft_model=... (the loaded draft it belongs to).")
        reconfigure = engine is not None and any(kwargs.get(name) is not None for name in _METHOD_FIELDS)
        if engine is not None:
            kwargs.setdefault("method", engine.method)
            model = draft = None
        elif llm is None:
            model = model or DEFAULT_TARGET
            if draft is None and draft_model is None and model == DEFAULT_TARGET:
                draft = DEFAULT_DRAFT  # the default pair goes together; another target names its draft
        super().__init__(model=model, draft=draft, **kwargs)
        config = self._engine_config()  # a bad method or budget fails now, not at the first call
        if engine is not None:
            self._engine = engine.with_config(config) if reconfigure else engine
        elif isinstance(config, _NEEDS_DRAFT) and self.draft is None and draft_model is None:
            raise ValueError(
                f"method {self.method!r} needs a draft model: pass draft=<name or path> or draft_model=..., "
                "or choose method='snapkv', 'streamingllm' or 'full', which need none."
            )
        self._target, self._tokenizer = llm, tokenizer
        self._draft_model, self._draft_tokenizer = draft_model, draft_tokenizer

    @classmethod
    def class_name(cls) -> str:
        return "SpecKVLLM"

    # -- configuration -----------------------------------------------------------------------
    def _engine_config(self) -> Any:
        fields: dict[str, Any] = {}
        if self.max_capacity_prompt is not None:
            fields["max_capacity_prompt"] = self.max_capacity_prompt
        if self.window_size is not None:
            fields["window_size"] = self.window_size
        if self.prompt_capacity is not None:
            if self.method.lower().replace("_", "-") != "speckv-pc":
                raise ValueError(
                    f"prompt_capacity is SpecKV-PC's prompt budget; with method={self.method!r} use "
                    "max_capacity_prompt, or set method='speckv-pc'."
                )
            fields["prompt_capacity"] = self.prompt_capacity
        if self.lookahead_tokens is not None:
            if self.method.lower().replace("_", "-") not in _LOOKAHEAD_METHODS:
                raise ValueError(
                    f"lookahead_tokens is the draft's lookahead of {', '.join(_LOOKAHEAD_METHODS)}; "
                    f"method {self.method!r} has no draft lookahead. Leave it unset."
                )
            fields["lookahead_tokens"] = self.lookahead_tokens
        return config_for_method(self.method, **fields)

    def _get_engine(self) -> SpecEngine:
        """The engine, loading the models on first use (once, even across threads)."""
        with self._lock:
            if self._engine is None:
                config = self._engine_config()
                target, tokenizer = self._target, self._tokenizer
                if target is None:
                    assert self.model is not None
                    target, tokenizer = get_model(self.model, dtype=self.dtype, device=self.device)
                draft, draft_tokenizer = self._draft_model, self._draft_tokenizer
                if draft is None and self.draft is not None and isinstance(config, _NEEDS_DRAFT):
                    draft, draft_tokenizer = get_model(self.draft, dtype=self.dtype, device=self.device)
                self._engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config)
            return self._engine

    def _loaded_target(self) -> Any:
        return self._engine.target if self._engine is not None else self._target

    @property
    def metadata(self) -> LLMMetadata:
        target = self._loaded_target()
        context_window = self.context_window
        if context_window is None and target is not None:
            context_window = getattr(target.config, "max_position_embeddings", None)
        name = self.model
        if name is None and target is not None:
            name = getattr(target, "spec_rag_name", None) or getattr(target.config, "_name_or_path", None)
        return LLMMetadata(
            context_window=context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=name or "spec-rag",
        )

    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine sampling arguments: the instance's, overridden by per-call keyword arguments."""
        max_new_tokens = kwargs.get("max_new_tokens", kwargs.get("max_tokens"))
        return {
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "seed": kwargs.get("seed", self.seed),
            "stop": kwargs.get("stop", self.stop),
        }

    # -- prompts -----------------------------------------------------------------------------
    def _completion_prompt(self, prompt: str, formatted: bool) -> Prompt:
        """What the engine gets for ``complete``: the text as-is when it is already formatted,
        else a user message for the chat template (or the user's ``completion_to_prompt``)."""
        if formatted:
            return prompt
        if self.query_wrapper_prompt is not None:
            prompt = self.query_wrapper_prompt.format(query_str=prompt)
        formatter = self.completion_to_prompt
        if formatter is not None and formatter is not default_completion_to_prompt:
            return formatter(prompt)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": prompt}]

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        """Role/content dicts for the target's chat template (or the user's ``messages_to_prompt``)."""
        formatter = self.messages_to_prompt
        if formatter is not None and formatter is not generic_messages_to_prompt:
            return formatter(messages)
        return [
            {"role": _ROLE_NAMES.get(message.role, message.role.value), "content": message.content or ""}
            for message in messages
        ]

    # -- the work, shared by every public method ---------------------------------------------
    def _generate(self, prompt: Prompt, kwargs: dict[str, Any]) -> Generation:
        generation = self._get_engine().generate(prompt, **self._sampling(kwargs))
        assert isinstance(generation, Generation)
        return generation

    def _deltas(self, prompt: Prompt, kwargs: dict[str, Any]) -> Iterator[tuple[str, str, Generation | None]]:
        """``(text so far, delta, None)`` per delta, then ``(text, "", generation)`` once done.

        The engine checks the prompt and loads the models here, before the first ``next``.
        """
        stream = self._get_engine().stream(prompt, **self._sampling(kwargs))
        return _stream_deltas(stream)

    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponse:
        generation = self._generate(self._completion_prompt(prompt, formatted), kwargs)
        usage = _usage(generation)
        return CompletionResponse(text=generation.text, raw=_raw(generation, usage), additional_kwargs=usage)

    def _stream_complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponseGen:
        deltas = self._deltas(self._completion_prompt(prompt, formatted), kwargs)

        def gen() -> CompletionResponseGen:
            for text, delta, generation in deltas:
                if generation is None:
                    yield CompletionResponse(text=text, delta=delta)
                else:
                    usage = _usage(generation)
                    yield CompletionResponse(
                        text=text, delta="", raw=_raw(generation, usage), additional_kwargs=usage
                    )

        return gen()

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        generation = self._generate(self._chat_prompt(messages), kwargs)
        usage = _usage(generation)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=generation.text),
            raw=_raw(generation, usage),
            additional_kwargs=usage,
        )

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        deltas = self._deltas(self._chat_prompt(messages), kwargs)

        def gen() -> ChatResponseGen:
            for text, delta, generation in deltas:
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                if generation is None:
                    yield ChatResponse(message=message, delta=delta)
                else:
                    usage = _usage(generation)
                    yield ChatResponse(
                        message=message, delta="", raw=_raw(generation, usage), additional_kwargs=usage
                    )

        return gen()

    # -- LlamaIndex API ----------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, formatted, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    # Async variants run the same work in a worker thread so the event loop stays free; a
    # stream moves to a thread per step (the engine's generator holds no thread-local state).
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return _in_threads(await asyncio.to_thread(self._stream_complete, prompt, formatted, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _in_threads(await asyncio.to_thread(self._stream_chat, messages, kwargs))


def _stream_deltas(stream: GenerationStream) -> Iterator[tuple[str, str, Generation | None]]:
    text = ""
    try:
        for delta in stream:
            text += delta
            yield text, delta, None
        assert stream.generation is not None
        yield stream.generation.text, "", stream.generation
    finally:
        stream.close()  # stops the engine when the consumer stops early


def _usage(generation: Generation) -> dict[str, int]:
    prompt_tokens = generation.stats.prompt_tokens
    completion_tokens = generation.stats.output_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _raw(generation: Generation, usage: dict[str, int]) -> dict[str, Any]:
    return {"usage": usage, "finish_reason": generation.finish_reason, "spec_rag": generation.stats.to_dict()}


async def _in_threads(items: Generator[Any, None, None]) -> AsyncGenerator[Any, None]:
    done = object()
    try:
        while (item := await asyncio.to_thread(next, items, done)) is not done:
            yield item
    finally:
        items.close()

"""A local Hugging Face model as a LlamaIndex LLM, answering under SpecKV (or any spec-rag method).

The target model writes the answer; a small draft model first writes an approximate answer
whose attention tells the target which prompt KV entries to keep, so long RAG prompts decode
from a small cache. The model work lives in :class:`spec_rag.SpecEngine` and the rules shared
with the LangChain adapter in :mod:`spec_rag.adapters`; this module only translates LlamaIndex
prompts and chat messages to engine requests and engine results back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
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

from spec_rag import Generation, SpecEngine
from spec_rag.adapters import (
    DEFAULT_MAX_INPUT_TOKENS,
    SAMPLING_FIELDS,
    SOURCE_NAMES,
    Budget,
    Delta,
    InputCeiling,
    LazyEngine,
    Lookahead,
    MaxNewTokens,
    Temperature,
    TopK,
    TopP,
    Window,
    ceiling,
    engine_source,
    in_threads,
    sampling_options,
    usage,
)

#: Reported as ``metadata.context_window`` until the target is loaded (SmolLM2's window; the
#: Qwen2.5 pair has 32k). Pass ``context_window=`` to pin it.
DEFAULT_CONTEXT_WINDOW = 8192

_ROLE_NAMES = {
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.DEVELOPER: "system",
}
_METHOD_FIELDS = ("max_capacity_prompt", "window_size", "prompt_capacity", "lookahead_tokens")

Prompt = str | list[dict[str, Any]]


class SpecKVLLM(CustomLLM):
    """A local causal LM with draft-guided KV-cache compression, for LlamaIndex.

    Give the target one of three ways (none: the Qwen2.5-Coder 1.5B pack with its 0.5B draft):

    - ``model="qwen2.5-coder-1.5b-instruct"``: a spec-rag model pack, a local directory or a
      hub id, loaded on first use and shared process-wide;
    - ``llm=..., tokenizer=...``: a loaded Hugging Face causal LM and its tokenizer;
    - ``engine=SpecEngine(...)``: a ready engine; method fields given beside it run its models
      under that method.

    The draft comes the same way: ``draft=<name or path>`` or ``draft_model=...`` (with
    ``draft_tokenizer=...`` when its tokenizer differs from the target's); it is only loaded for
    methods that use it, and a target you name needs its draft named.

    ``method`` is ``"speckv"`` (default), ``"specpc"``, ``"speckv-pc"``, ``"snapkv"``,
    ``"streamingllm"`` or ``"full"``; ``max_capacity_prompt`` is its budget (KV entries kept
    per head, or prompt tokens for SpecPC), ``prompt_capacity`` SpecKV-PC's prompt budget.
    ``None`` keeps the method's default.

    Chat messages go through the target's chat template. ``complete(prompt)`` sends the prompt
    as a user message (after ``system_prompt``); ``complete(prompt, formatted=True)`` feeds it
    to the model as-is. Message contents and prompt strings are untrusted (retrieved text lands
    in them): control-token text in them, e.g. ``<|im_start|>``, is read as plain text, so only
    the target's chat template opens and closes turns. A ``messages_to_prompt`` or
    ``completion_to_prompt`` of your own that writes template markers on purpose returns a
    :class:`spec_rag.TrustedPrompt` (and so does a ``formatted=True`` prompt you templated);
    the default path sends messages, never a rendered string. Responses carry the token usage
    in ``raw["usage"]`` and the engine's statistics (method, prompt and cache sizes, timings)
    in ``raw["spec_rag"]``; a stream's last response carries them together with the last
    delta. ``get_tokenizer()`` gives the target's tokenizer as a callable for
    ``Settings.tokenizer``.

    Example:
        >>> llm = SpecKVLLM(model="smollm2-135m-instruct", draft="smollm2-135m-instruct")
        >>> llm.complete("What is the capital of France?").text  # doctest: +SKIP
    """

    model: str | None = Field(
        default=None, description="Target model: a spec-rag pack name, a local path or a hub id."
    )
    draft: str | None = Field(
        default=None, description="Draft model: a spec-rag pack name, a local path or a hub id."
    )
    method: str = Field(
        default="speckv", description="full, specpc, speckv, speckv-pc, snapkv or streamingllm."
    )
    max_capacity_prompt: Budget | None = Field(
        default=None, description="The method's budget (None: its default)."
    )
    window_size: Window | None = Field(default=None, description="Last prompt positions always kept.")
    prompt_capacity: Budget | None = Field(default=None, description="SpecKV-PC's prompt budget.")
    lookahead_tokens: Lookahead | None = Field(
        default=None,
        description="Tokens the draft writes ahead for scoring (speckv, speckv-pc: None writes as many "
        "as the answer may have; specpc: None keeps its default).",
    )
    max_new_tokens: MaxNewTokens = Field(default=256, description="Most tokens generated per answer.")
    temperature: Temperature = Field(default=0.0, description="0 is greedy decoding.")
    top_p: TopP = Field(default=1.0, description="Nucleus sampling mass.")
    top_k: TopK = Field(default=0, description="Sample from the k most likely tokens (0: all).")
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible sampled answers.")
    stop: list[str] | None = Field(default=None, description="Strings that end an answer (not included).")
    context_window: Budget | None = Field(
        default=None, description="Context window reported to LlamaIndex (None: the target's)."
    )
    dtype: str = Field(default="bfloat16", description="dtype the models are loaded in (by name).")
    device: str | None = Field(default=None, description="Device the models are loaded on (default CPU).")
    max_input_tokens: InputCeiling = Field(
        default=DEFAULT_MAX_INPUT_TOKENS,
        description="Most prompt tokens a request may have (None: no ceiling; unset: the engine's).",
    )

    _core: LazyEngine = PrivateAttr()

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
        super().__init__(model=model, draft=draft, **kwargs)
        given = (model, llm, tokenizer, engine, draft, draft_model, draft_tokenizer)
        fields = {name: getattr(self, name) for name in _METHOD_FIELDS}
        source = engine_source(
            "SpecKVLLM",
            **dict(zip(SOURCE_NAMES, given, strict=True)),
            method=kwargs.get("method"),
            fields=fields,
            dtype=self.dtype,
            device=self.device,
            max_input_tokens=ceiling(self),
        )
        self.model, self.draft, self.method = source.model, source.draft, source.method
        self.max_input_tokens = source.max_input_tokens
        self._core = LazyEngine(source)

    @classmethod
    def class_name(cls) -> str:
        return "SpecKVLLM"

    def _get_engine(self) -> SpecEngine:
        """The engine, loading the models on first use (once, even across threads)."""
        return self._core.get()

    @property
    def metadata(self) -> LLMMetadata:
        target = self._core.target()
        context_window = self.context_window
        if context_window is None and target is not None:
            context_window = getattr(target.config, "max_position_embeddings", None)
        return LLMMetadata(
            context_window=context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=self._core.model_name(),
        )

    def get_tokenizer(self) -> Callable[[str], list[int]]:
        """The target's tokenizer as LlamaIndex wants it (``Settings.tokenizer = llm.get_tokenizer()``):
        text in, token ids out. Models given by name load on its first call."""
        return self._core.tokenize

    def count_tokens(self, messages: str | Sequence[ChatMessage]) -> int:
        """Tokens the target reads for a completion text, or for chat messages (chat template
        included), counted with the target's own tokenizer."""
        return self._core.count_tokens(messages if isinstance(messages, str) else self._chat_prompt(messages))

    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine sampling arguments: the instance's, overridden by per-call keyword arguments."""
        defaults = {n: getattr(self, n) for n in ("max_new_tokens", "stop", *SAMPLING_FIELDS)}
        return sampling_options("SpecKVLLM", defaults, kwargs)

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
    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponse:
        generation = self._core.generate(self._completion_prompt(prompt, formatted), self._sampling(kwargs))
        return CompletionResponse(text=generation.text, **_extras(generation))

    def _stream_complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponseGen:
        deltas = self._core.stream(self._completion_prompt(prompt, formatted), self._sampling(kwargs))

        def gen() -> CompletionResponseGen:
            for text, delta in _texts(deltas):
                yield CompletionResponse(text=text, delta=delta.text, **_extras(delta.generation))

        return gen()

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        generation = self._core.generate(self._chat_prompt(messages), self._sampling(kwargs))
        message = ChatMessage(role=MessageRole.ASSISTANT, content=generation.text)
        return ChatResponse(message=message, **_extras(generation))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        deltas = self._core.stream(self._chat_prompt(messages), self._sampling(kwargs))

        def gen() -> ChatResponseGen:
            for text, delta in _texts(deltas):
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                yield ChatResponse(message=message, delta=delta.text, **_extras(delta.generation))

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
        return in_threads(await asyncio.to_thread(self._stream_complete, prompt, formatted, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return in_threads(await asyncio.to_thread(self._stream_chat, messages, kwargs))


def _texts(deltas: Iterator[Delta]) -> Iterator[tuple[str, Delta]]:
    """Each delta with the text so far."""
    text = ""
    for delta in deltas:
        text += delta.text
        yield text, delta


def _extras(generation: Generation | None) -> dict[str, Any]:
    """``raw`` and ``additional_kwargs`` of a response: usage and statistics, on a finished one."""
    if generation is None:
        return {}
    counts = usage(generation)
    raw = {"usage": counts, "finish_reason": generation.finish_reason, "spec_rag": generation.stats.to_dict()}
    return {"raw": raw, "additional_kwargs": counts}

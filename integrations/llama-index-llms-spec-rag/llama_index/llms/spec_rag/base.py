"""A local Hugging Face model as a LlamaIndex LLM, answering under SpecKV (or any spec-rag method).

The target model writes the answer; a small draft model first writes an approximate answer
whose attention tells the target which prompt KV entries to keep, so long RAG prompts decode
from a small cache. The model work lives in :class:`spec_rag.SpecEngine` and the rules shared
with the LangChain adapter in :mod:`spec_rag.adapters`; this module only translates LlamaIndex
prompts, chat messages, tools and output classes to engine requests and engine results back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, ValidationError
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import PydanticProgramMode

from spec_rag import DEFAULT_METHOD, Generation, SpecEngine
from spec_rag.adapters import (
    DEFAULT_MAX_INPUT_TOKENS,
    PREFILL_CHUNK_SIZE,
    SAMPLING_FIELDS,
    SOURCE_NAMES,
    Budget,
    Delta,
    InputCeiling,
    LazyEngine,
    Lookahead,
    MaxNewTokens,
    PrefillChunk,
    Temperature,
    TopK,
    TopP,
    Window,
    engine_source,
    in_threads,
    resolve_tool_choice,
    sampling_options,
    split_tool_options,
    usage,
    user_set,
)
from spec_rag.errors import InvalidInputError

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel
    from llama_index.core.tools.types import BaseTool

dispatcher = get_dispatcher(__name__)
Model = TypeVar("Model", bound=BaseModel)

#: Reported as ``metadata.context_window`` until the target is loaded (SmolLM2's window; the
#: Qwen2.5 pair has 32k). Pass ``context_window=`` to pin it.
DEFAULT_CONTEXT_WINDOW = 8192

_ROLE_NAMES = {
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.DEVELOPER: "system",
    MessageRole.FUNCTION: "tool",
}
_METHOD_FIELDS = ("max_capacity_prompt", "window_size", "prompt_capacity", "lookahead_tokens")

Prompt = str | list[dict[str, Any]]


class SpecKVLLM(FunctionCallingLLM):
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

    ``method`` is ``"speckv-pc"`` (default), ``"speckv"``, ``"specpc"``, ``"snapkv"``,
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

    It is a :class:`~llama_index.core.llms.function_calling.FunctionCallingLLM` when the target's
    chat template renders tools (``metadata.is_function_calling_model``; the Qwen2.5 pair's does,
    SmolLM2's does not): ``chat_with_tools``, ``predict_and_call`` and ``FunctionAgent`` work, the
    template renders the tools, a forced call (``tool_required=True`` or ``tool_choice=<name>``)
    is constrained by a JSON grammar, and calls come back as ``ToolCallBlock`` blocks (and
    ``additional_kwargs["tool_calls"]``). Tool results, retrieved documents included, are
    compressed with the rest of the conversation. ``structured_predict`` and
    ``as_structured_llm`` decode JSON constrained to the output class's schema, so the answer
    always validates (any target); ``pydantic_program_mode="function"`` goes through a forced
    tool call instead.

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
        default=DEFAULT_METHOD,
        description="speckv-pc (default), speckv, specpc, snapkv, streamingllm or full.",
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
    dtype: str = Field(
        default="auto",
        description="dtype the models are loaded in (by name); auto: bfloat16 where the device "
        "computes it natively, else float32.",
    )
    device: str | None = Field(default=None, description="Device the models are loaded on (default CPU).")
    max_input_tokens: InputCeiling = Field(
        default=DEFAULT_MAX_INPUT_TOKENS,
        description="Most prompt tokens a request may have (None: no ceiling; unset: the engine's).",
    )
    prefill_chunk_size: PrefillChunk = Field(
        default=PREFILL_CHUNK_SIZE,
        description="A longer prefill (target's, draft's) runs in chunks of this many tokens, which "
        "bounds its memory (None: one pass; unset: the engine's).",
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
            max_input_tokens=user_set(self, "max_input_tokens"),
            prefill_chunk_size=user_set(self, "prefill_chunk_size"),
        )
        self.model, self.draft, self.method = source.model, source.draft, source.method
        self.max_input_tokens, self.prefill_chunk_size = source.max_input_tokens, source.prefill_chunk_size
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
            is_function_calling_model=self._core.supports_tools(),
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
        """Engine arguments: the instance's sampling settings, overridden by per-call keyword
        arguments, and the call's ``tools``, ``tool_choice`` and ``response_format``."""
        call, tool_options = split_tool_options(kwargs)
        defaults = {n: getattr(self, n) for n in ("max_new_tokens", "stop", *SAMPLING_FIELDS)}
        return {**sampling_options("SpecKVLLM", defaults, call), **tool_options}

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

    def _chat_prompt(self, messages: Sequence[ChatMessage], tools: bool = False) -> Prompt:
        """Message dicts for the target's chat template (or the user's ``messages_to_prompt``;
        not with ``tools``, which only the chat template renders)."""
        formatter = self.messages_to_prompt
        if formatter is not None and formatter is not generic_messages_to_prompt:
            if tools:
                raise InvalidInputError(
                    "SpecKVLLM renders tools with the target's chat template, and this instance has a "
                    "messages_to_prompt of its own; drop messages_to_prompt to call tools."
                )
            return formatter(messages)
        return _message_dicts(messages)

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
        options = self._sampling(kwargs)
        generation = self._core.generate(self._chat_prompt(messages, "tools" in options), options)
        return ChatResponse(message=_assistant_message(generation), **_extras(generation))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        options = self._sampling(kwargs)
        deltas = self._core.stream(self._chat_prompt(messages, "tools" in options), options)

        def gen() -> ChatResponseGen:
            for text, delta in _texts(deltas):
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                if delta.generation is not None and delta.generation.tool_calls:
                    message = _assistant_message(delta.generation)  # the last: the text and the calls
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

    # -- function calling --------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments for a turn with ``tools``: their OpenAI-style specs, which the chat
        template renders, and the engine's ``tool_choice`` (``tool_required=True``: one call,
        forced; ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or a tool's name)."""
        messages = list(chat_history or [])  # the caller's history is left as it was
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        if not specs:
            return {"messages": messages, **kwargs}
        self._core.check_tools()
        names = [spec["function"]["name"] for spec in specs]
        choice = resolve_tool_choice("SpecKVLLM", tool_choice, names, required=tool_required)
        return {"messages": messages, "tools": specs, "tool_choice": choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without ``allow_parallel_tool_calls``, only the first call is kept."""
        if not allow_parallel_tool_calls:
            _keep_first_call(response.message)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The response's tool calls, in order, as ``ToolSelection`` objects (id, name, arguments)."""
        calls = _tool_calls(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError(
                "Expected at least one tool call, but got 0 tool calls; the model answered: "
                f"{(response.message.content or '')[:200]!r}. Pass tool_required=True (or "
                "tool_choice=<name>) to force a call."
            )
        return [
            ToolSelection(
                tool_id=str(call.get("id") or ""),
                tool_name=call["function"]["name"],
                tool_kwargs=call["function"]["arguments"],
            )
            for call in calls
        ]

    # -- structured output -------------------------------------------------------------------
    # In the default program mode the answer is JSON constrained to the output class's schema
    # (``response_format``), so it always validates and needs no tool support; the function and
    # text-completion program modes go through LlamaIndex's own programs.
    def _constrained_json(self) -> bool:
        return self.pydantic_program_mode == PydanticProgramMode.DEFAULT

    def _schema_call(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None,
        args: Any,
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        messages = self._extend_messages(prompt.format_messages(**args))
        options = {
            k: v for k, v in (llm_kwargs or {}).items() if k not in ("tools", "tool_choice", "tool_required")
        }
        return messages, {**options, "response_format": output_cls}

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An instance of ``output_cls`` answering ``prompt``: JSON decoded under its schema."""
        if not self._constrained_json():
            return super().structured_predict(output_cls, prompt, llm_kwargs=llm_kwargs, **prompt_args)
        messages, options = self._schema_call(output_cls, prompt, llm_kwargs, prompt_args)
        return _parse(output_cls, self.chat(messages, **options))

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """``structured_predict`` with the work in a worker thread."""
        if not self._constrained_json():
            return await super().astructured_predict(output_cls, prompt, llm_kwargs=llm_kwargs, **prompt_args)
        messages, options = self._schema_call(output_cls, prompt, llm_kwargs, prompt_args)
        return _parse(output_cls, await self.achat(messages, **options))

    def _structured_stream_call(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | list[Model] | FlexibleModel | list[FlexibleModel], None, None]:
        if not self._constrained_json():
            yield from super()._structured_stream_call(output_cls, prompt, llm_kwargs, **prompt_args)
            return
        from llama_index.core.program.streaming_utils import process_streaming_content_incremental

        messages, options = self._schema_call(output_cls, prompt, llm_kwargs, prompt_args)
        current = None
        for response in self.stream_chat(messages, **options):
            current = process_streaming_content_incremental(response, output_cls, current)
            yield current

    async def _structured_astream_call(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | list[Model] | FlexibleModel | list[FlexibleModel], None]:
        if not self._constrained_json():
            return await super()._structured_astream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        from llama_index.core.program.streaming_utils import process_streaming_content_incremental

        messages, options = self._schema_call(output_cls, prompt, llm_kwargs, prompt_args)

        async def gen() -> AsyncGenerator[Model | FlexibleModel, None]:
            current = None
            async for response in await self.astream_chat(messages, **options):
                current = process_streaming_content_incremental(response, output_cls, current)
                yield current

        return gen()


def _parse(output_cls: type[Model], response: ChatResponse) -> Model:
    """The answer's JSON as ``output_cls``; an answer cut at ``max_new_tokens`` says so."""
    text = response.message.content or ""
    try:
        return output_cls.model_validate_json(text)
    except ValidationError as error:
        raw = response.raw if isinstance(response.raw, Mapping) else {}
        if raw.get("finish_reason") == "length":
            raise ValueError(
                f"The {output_cls.__name__} answer stopped at the token limit before its JSON was complete "
                f"({len(text)} characters). Raise max_new_tokens (on SpecKVLLM, or per call with "
                "llm_kwargs={'max_new_tokens': ...})."
            ) from error
        raise


# -- chat messages to and from the template's message dicts --------------------------------
def _message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Role/content dicts for the chat template: an assistant turn carries its ``tool_calls``,
    a tool result its ``tool_call_id`` and the called tool's ``name`` (found from the call)."""
    names: dict[str, str] = {}  # tool call id -> tool name, from the assistant turns so far
    dicts: list[dict[str, Any]] = []
    for message in messages:
        role = _ROLE_NAMES.get(message.role, message.role.value)
        entry: dict[str, Any] = {"role": role, "content": message.content or ""}
        calls = _tool_calls(message)
        if calls:
            entry["tool_calls"] = calls
            names.update((str(call["id"]), call["function"]["name"]) for call in calls if call.get("id"))
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id:
                entry["tool_call_id"] = str(call_id)
            name = message.additional_kwargs.get("name") or names.get(str(call_id))
            if name:
                entry["name"] = str(name)
        dicts.append(entry)
    return dicts


def _tool_calls(message: ChatMessage) -> list[dict[str, Any]]:
    """A message's tool calls as template dicts (arguments a dict): its ``ToolCallBlock`` blocks,
    else ``additional_kwargs["tool_calls"]`` (dicts, or objects, in OpenAI's form)."""
    blocks = [block for block in message.blocks if isinstance(block, ToolCallBlock)]
    if blocks:
        return [_call_dict(block.tool_call_id, block.tool_name, block.tool_kwargs) for block in blocks]
    calls = []
    for call in message.additional_kwargs.get("tool_calls") or []:
        get = call.get if isinstance(call, Mapping) else lambda key, c=call: getattr(c, key, None)
        function = get("function")
        if function is None:
            continue
        fget = (
            function.get if isinstance(function, Mapping) else lambda key, f=function: getattr(f, key, None)
        )
        calls.append(_call_dict(get("id"), fget("name") or "", fget("arguments")))
    return calls


def _call_dict(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else the template shows it as written
            arguments = json.loads(arguments) if arguments.strip() else {}
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments or {}}}
    if call_id:
        call["id"] = call_id
    return call


def _assistant_message(generation: Generation) -> ChatMessage:
    """The assistant's message: its text, then a ``ToolCallBlock`` per call (also in
    ``additional_kwargs["tool_calls"]``, OpenAI's form)."""
    calls = generation.tool_calls
    if not calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=generation.text)
    blocks: list[Any] = [TextBlock(text=generation.text)] if generation.text.strip() else []
    blocks += [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments)) for c in calls
    ]
    dicts = [call.to_message_dict() for call in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs={"tool_calls": dicts})


def _keep_first_call(message: ChatMessage) -> None:
    """Drop every tool call after the first, from the blocks and ``additional_kwargs``."""
    seen = False
    kept = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            if seen:
                continue
            seen = True
        kept.append(block)
    message.blocks = kept
    calls = message.additional_kwargs.get("tool_calls")
    if calls:
        message.additional_kwargs["tool_calls"] = list(calls)[:1]


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

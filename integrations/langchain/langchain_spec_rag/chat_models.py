"""ChatSpecKV: a local Hugging Face chat model served by spec-rag's SpecEngine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from spec_rag import DEFAULT_METHOD, Generation, SpecEngine, supports_tools
from spec_rag import adapters as core

_ROLES = {"system": "system", "developer": "system", "human": "user", "ai": "assistant"}
# Content blocks of an AI message that repeat its tool calls (Anthropic's, LangChain's v1).
_CALL_BLOCKS = ("tool_use", "tool_call", "tool_call_chunk", "function_call")
_METHOD_FIELDS = ("max_capacity_prompt", "window_size", "prompt_capacity", "lookahead_tokens")


class ChatSpecKV(BaseChatModel):
    """A local chat model whose long prompts are served with draft-based approximate inference.

    A small draft model guides the target: ``"speckv"`` keeps the target's KV entries that the
    draft's approximate answer attends to, ``"specpc"`` shortens the prompt itself, and
    ``"speckv-pc"`` does both. ``"snapkv"``, ``"streamingllm"`` and ``"full"`` are the
    baselines. Models are loaded on first use through spec-rag's shared cache, so many
    instances with the same names share one copy in memory.

    Give the target one of three ways (none: the Qwen2.5-Coder 1.5B pack with its 0.5B draft):
        model: a name or path for ``spec_rag.get_model`` (e.g. ``"qwen2.5-coder-1.5b-instruct"``).
        llm / tokenizer: an already loaded Hugging Face causal LM and its tokenizer.
        engine: a ready ``spec_rag.SpecEngine``; method fields given beside it run its models
            under that method.

    and the draft (needed by speckv, specpc and speckv-pc) as ``draft`` (name or path) or
    ``draft_model`` (with ``draft_tokenizer`` when its tokenizer is not the target's).

    Args:
        method: ``"speckv-pc"`` (default: the fastest and leanest at near-full accuracy in
            spec-rag's long-context measurements), ``"speckv"``, ``"specpc"``, ``"snapkv"``,
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
        max_input_tokens: ceiling on a request's prompt tokens (``None``: none; unset: the
            ``engine``'s, else spec-rag's default); a larger request raises ``InputTooLargeError``.
        prefill_chunk_size: a prefill (the target's, the draft's) longer than this runs in
            chunks of this many tokens, which bounds its memory on long prompts (``None``: one
            pass; unset: the ``engine``'s, else 2048).
        timeout, max_retries, api_key: accepted for drop-in compatibility and ignored; the
            model runs in this process.

    ``get_num_tokens`` and ``get_num_tokens_from_messages`` count with the target's own
    tokenizer and chat template, so ``trim_messages(..., token_counter=llm)`` trims to what the
    model reads. A stream's last chunk carries the last text, the usage and the statistics.

    ``bind_tools`` and ``with_structured_output`` work as with ``ChatOpenAI``: tools are
    rendered by the target's chat template (the Qwen2.5 templates have them; SmolLM2's has
    not), calls come back as ``AIMessage.tool_calls`` and go in again with ``ToolMessage``
    results, which the method compresses like any other text. Forced calls and JSON answers
    are decoded under their schema. Non-text inputs are not supported.

    Example:
        .. code-block:: python

            from langchain_spec_rag import ChatSpecKV

            llm = ChatSpecKV(
                model="qwen2.5-coder-1.5b-instruct",
                draft="qwen2.5-coder-0.5b-instruct",
                method="speckv-pc",
                prompt_capacity=2048,  # prompt tokens the target reads
                max_capacity_prompt=1024,  # KV entries per head it keeps
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

    method: str = DEFAULT_METHOD
    max_capacity_prompt: core.Budget | None = None
    window_size: core.Window | None = None
    prompt_capacity: core.Budget | None = None
    lookahead_tokens: core.Lookahead | None = None

    max_tokens: core.MaxNewTokens = Field(default=256, alias="max_new_tokens")
    temperature: core.Temperature = 0.0
    top_p: core.TopP = 1.0
    top_k: core.TopK = 0
    seed: int | None = None
    stop: list[str] | None = None
    streaming: bool = False
    dtype: str = "auto"
    device: str | None = None
    max_input_tokens: core.InputCeiling = core.DEFAULT_MAX_INPUT_TOKENS
    prefill_chunk_size: core.PrefillChunk = core.PREFILL_CHUNK_SIZE

    timeout: float | None = None
    max_retries: int | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    _core: core.LazyEngine = PrivateAttr()

    # -- construction (cheap: nothing is loaded here) ------------------------------------------
    @model_validator(mode="after")
    def _check_sources(self) -> ChatSpecKV:
        method = self.method if "method" in self.model_fields_set else None
        fields = {name: getattr(self, name) for name in _METHOD_FIELDS}
        sources = {name: getattr(self, name) for name in core.SOURCE_NAMES}
        source = core.engine_source(
            "ChatSpecKV",
            **sources,
            method=method,
            fields=fields,
            dtype=self.dtype,
            device=self.device,
            max_input_tokens=core.user_set(self, "max_input_tokens"),
            prefill_chunk_size=core.user_set(self, "prefill_chunk_size"),
        )
        self.model, self.draft, self.method = source.model, source.draft, source.method
        self.max_input_tokens, self.prefill_chunk_size = source.max_input_tokens, source.prefill_chunk_size
        self._core = core.LazyEngine(source)
        return self

    def _resolve_model_profile(self) -> ModelProfile | None:
        profile = ModelProfile(
            open_weights=True,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            structured_output=True,
        )
        # Tools need a chat template that renders them: known here only for a loaded tokenizer.
        tokenizer = self.tokenizer if self.engine is None else self.engine.tokenizer
        if tokenizer is not None:
            profile["tool_calling"] = profile["tool_choice"] = supports_tools(tokenizer)
        return profile

    @property
    def model_name(self) -> str:
        """The target's name: ``model``, or the loaded model's ``name_or_path``."""
        return self._core.model_name()

    # -- LangChain plumbing ---------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "spec-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        names = ("draft", "method", *_METHOD_FIELDS, "max_tokens", "temperature", "top_p", "top_k", "seed")
        return {"model_name": self.model_name, **{n: getattr(self, n) for n in names}, "stop": self.stop}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="spec_rag",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens)),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # -- tools and structured output ----------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools for the target's chat template to show and the model to call.

        Args:
            tools: anything ``convert_to_openai_tool`` takes: ``@tool`` functions and other
                ``BaseTool``s, pydantic models, TypedDicts, functions, OpenAI tool dicts.
            tool_choice: ``None`` / ``"auto"``: the model may call tools; ``"none"``: it may not;
                ``"any"`` / ``"required"`` / ``True``: exactly one call; a tool's name or
                ``{"type": "function", "function": {"name": ...}}``: a call of that tool. Forced
                calls are decoded under the tool's JSON schema, so their arguments always parse.
            **kwargs: other options bound to every call (e.g. ``max_tokens``).

        The calls come back as ``AIMessage.tool_calls``; streamed, the text comes as it is
        written up to a call's opening tag, and the calls as ``tool_call_chunks`` of the last
        chunk. Raises ``ToolsNotSupportedError`` when the
        target's chat template cannot render tools (here if the model is loaded, else at the
        first call).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        self._core.check_tools(load=False)
        options = core.tool_options("ChatSpecKV", tools=formatted, choice=tool_choice)
        return super().bind(**options, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable that answers with an instance of ``schema``.

        Args:
            schema: a pydantic model (answers are instances of it), a TypedDict or a JSON schema
                (answers are dicts); ``method="json_mode"`` needs none.
            method: ``"function_calling"`` (default): one forced call of a tool whose parameters
                are the schema, which the chat template shows the model with its descriptions;
                needs a template with tools. ``"json_schema"``: the answer itself is decoded
                under the schema, with any template. ``"json_mode"``: any JSON object, or one valid
                for ``schema`` when it is given (the parser reads it as that). All three
                are constrained by a grammar, so the JSON always parses.
            include_raw: answer ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
            strict: accepted for compatibility; decoding follows the schema in every case.
        """
        del strict  # constrained decoding always follows the schema
        if kwargs:
            raise ValueError(f"ChatSpecKV.with_structured_output got unsupported arguments {sorted(kwargs)}.")
        if schema is None and method != "json_mode":
            raise ValueError(
                f"with_structured_output(method={method!r}) needs a schema: a pydantic model, a TypedDict or "
                "a JSON schema dict (method='json_mode' takes none)."
            )
        pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=traced)
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if pydantic_schema
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            # json_mode with a schema decodes under it too: the parser reads the answer as that
            # schema, and a small model left free writes "{}" as readily as the object asked for.
            response_format = convert_to_json_schema(schema) if schema is not None else {"type": "object"}
            options = core.tool_options("ChatSpecKV", response_format=response_format)
            if schema is not None:
                options["ls_structured_output_format"] = traced
            llm = self.bind(**options)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(
                f"unknown structured output method {method!r}; use 'function_calling', 'json_schema' or "
                "'json_mode'."
            )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # -- token counting (the target's tokenizer and chat template; no download) ----------------
    def get_num_tokens(self, text: str) -> int:
        return self._core.count_tokens(text)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        formatted = [convert_to_openai_tool(tool) for tool in tools or []]
        return self._core.count_tokens(_to_chat(messages), tools=formatted or None)

    def get_token_ids(self, text: str) -> list[int]:
        return self._core.tokenize(text)

    # -- generation -----------------------------------------------------------------------------
    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Chat messages for the engine, and its generation options (instance + per call)."""
        override = kwargs.pop("model", None)
        if override is not None and override != self.model_name:
            raise ValueError(
                f"ChatSpecKV runs the local model {self.model_name!r} and cannot switch to {override!r} "
                "per call; create another ChatSpecKV(model=...) (loaded models are shared)."
            )
        kwargs.pop("stream", None)  # set by LangChain's streaming plumbing, not a model option
        defaults = {"max_new_tokens": self.max_tokens, **{n: getattr(self, n) for n in core.SAMPLING_FIELDS}}
        kwargs["stop"] = [*(self.stop or []), *(stop or []), *(kwargs.get("stop") or [])]
        tools = core.tool_options(
            "ChatSpecKV",
            tools=kwargs.pop("tools", None),
            choice=kwargs.pop("tool_choice", None),
            response_format=kwargs.pop("response_format", None),
        )
        return _to_chat(messages), {**core.sampling_options("ChatSpecKV", defaults, kwargs), **tools}

    def _metadata(self, generation: Generation) -> tuple[UsageMetadata, dict[str, Any]]:
        counts = core.usage(generation)
        metadata = UsageMetadata(
            input_tokens=counts["prompt_tokens"],
            output_tokens=counts["completion_tokens"],
            total_tokens=counts["total_tokens"],
        )
        response = {
            "model_name": self.model_name,
            "finish_reason": generation.finish_reason,
            "spec_rag": generation.stats.to_dict(),
        }
        return metadata, response

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        generation = self._core.generate(*self._request(messages, stop, kwargs))
        usage_metadata, response = self._metadata(generation)
        calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in generation.tool_calls]
        message = AIMessage(
            content=generation.text,
            tool_calls=calls,
            usage_metadata=usage_metadata,
            response_metadata=response,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, delta: core.Delta) -> ChatGenerationChunk:
        if delta.generation is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
        usage_metadata, response = self._metadata(delta.generation)
        calls = [
            tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i)
            for i, c in enumerate(delta.generation.tool_calls)
        ]
        message = AIMessageChunk(
            content=delta.text,
            tool_call_chunks=calls,
            usage_metadata=usage_metadata,
            response_metadata=response,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        deltas = self._core.stream(*self._request(messages, stop, kwargs))
        for delta in deltas:
            chunk = self._chunk(delta)
            if run_manager and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Decoding is CPU/GPU work in this process: each step runs in a worker thread.
        deltas = self._core.stream(*self._request(messages, stop, kwargs))
        async for delta in core.in_threads(deltas):
            chunk = self._chunk(delta)
            if run_manager and delta.text:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk


def _to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as message dicts for the tokenizer's chat template: ``{"role",
    "content"}``, an AI message's ``tool_calls``, a tool message's ``tool_call_id`` and name."""
    chat = []
    for message in messages:
        if isinstance(message, ToolMessage):
            chat.append(core.tool_turn(_text(message), message.tool_call_id, message.name))
            continue
        if isinstance(message, AIMessage) and message.tool_calls:
            calls = [(c["id"], c["name"], c["args"]) for c in message.tool_calls]
            chat.append(core.assistant_turn(_text(message), calls))
            continue
        if isinstance(message, ChatMessage):
            role = message.role
        elif message.type in _ROLES:
            role = _ROLES[message.type]
        else:
            raise ValueError(
                f"ChatSpecKV cannot take a {type(message).__name__}: it takes system, human, ai, tool and "
                "chat messages."
            )
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
        elif isinstance(message, AIMessage) and isinstance(block, dict) and block.get("type") in _CALL_BLOCKS:
            continue  # the same calls are in message.tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatSpecKV takes text only; got a {kind!r} content block.")
    return "".join(parts)

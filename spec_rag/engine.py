"""SpecEngine: one object that answers prompts with full inference, SpecPC, SpecKV, SpecKV-PC,
SnapKV or StreamingLLM, with the same statistics for each so they compare fairly."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

import torch
from pydantic import BaseModel, ValidationError

from spec_rag._prompt import (
    DEFAULT_MAX_INPUT_TOKENS,
    Prompt,
    check_prompt,
    eos_ids,
    is_messages,
    same_vocabulary,
    with_tools,
)
from spec_rag.config import PREFILL_CHUNK_SIZE, EngineConfig, method_info
from spec_rag.constrained import Constraint, Guide
from spec_rag.errors import InvalidInputError
from spec_rag.generation import (
    DecodeResult,
    GenerationStats,
    Prefilled,
    Sampler,
    SamplingParams,
    TextStream,
    decode_tokens,
)
from spec_rag.methods import Method, Models, Request, ScoredPrompt, build_method
from spec_rag.scoring import try_enable_scoring
from spec_rag.tools import (
    ToolCall,
    check_supports_tools,
    check_tool_choice,
    normalize_tools,
    parse_tool_calls,
    tool_call_tags,
    tool_name,
)

#: A JSON schema (dict, or OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}``)
#: or a pydantic model class.
ResponseFormat = Mapping[str, Any] | type[BaseModel]

__all__ = ["Generation", "GenerationStats", "GenerationStream", "ScoredPrompt", "SpecEngine"]


@dataclass
class Generation:
    """One answer. When tools were given, ``text`` is the content with the tool-call blocks
    removed and ``tool_calls`` the calls the model wrote, in order."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class _Structure:
    """What shapes one request's answer: the tools rendered, the choice, the grammar."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    constraint: Constraint | None = None
    banned: tuple[int, ...] = ()
    trigger: tuple[int, Constraint] | None = None  # "auto": a call, once opened, follows the grammar

    @property
    def guided(self) -> bool:
        """Whether the answer has a grammar, a banned token or a trigger to follow."""
        return self.constraint is not None or bool(self.banned) or self.trigger is not None

    def guide(self) -> Guide | None:
        if not self.guided:
            return None
        state = self.constraint.new_state() if self.constraint is not None else None
        return Guide(state, self.banned, self.trigger)


class GenerationStream:
    """Iterator of text deltas; ``generation`` holds the finished :class:`Generation` at the end.

    Closing it early (``close()``, ``break`` out of a ``for`` loop and dropping it) stops the
    work: generation runs in the consumer's thread, so nothing is left running.
    """

    def __init__(
        self,
        engine: SpecEngine,
        params: SamplingParams,
        prefill: _Prefill,
        stats: GenerationStats,
        structure: _Structure | None = None,
        guide: Guide | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.generation: Generation | None = None
        self._iterator = engine._run(params, self, prefill, stats, structure or _Structure(), guide, sampler)

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()


#: The prefill of one request: fills in its part of the stats and hands over to decoding.
_Prefill = Callable[[], Prefilled]

_STRUCTURE_DOC = """
        ``tools`` (OpenAI-style ``{"type": "function", "function": {"name", "description",
        "parameters"}}`` or bare ``{"name", "description", "parameters"}``) are rendered by the
        chat template (chat messages only; a template without tools raises
        :class:`~spec_rag.tools.ToolsNotSupportedError`); the calls the model writes come back
        in ``Generation.tool_calls``. ``tool_choice``: ``None``/"auto" lets the model choose,
        "none" shows the tools but forbids a call, "required" (or "any") forces one call of one
        of the tools and a tool's name one call of that tool, both written under a grammar, so
        the arguments validate against the tool's parameters. ``response_format`` (a JSON schema
        or a pydantic model class) makes the answer one JSON value valid for it, and
        ``constraint`` applies any prebuilt :class:`~spec_rag.constrained.Constraint`."""


class SpecEngine:
    """Answers prompts with a target model, guided by a draft model.

    Args:
        target: the large model that writes the answer (a Hugging Face causal LM).
        tokenizer: the target's tokenizer.
        draft: the small model (needed for SpecPC, SpecKV and SpecKV-PC).
        draft_tokenizer: the draft's tokenizer (default: ``tokenizer``). When the two
            vocabularies differ, text is handed over instead of token ids.
        config: a method config; ``None`` means full inference.
        max_input_tokens: ceiling on a request's prompt tokens (``None``: none but the models'
            context windows); a larger request raises :class:`~spec_rag.errors.InputTooLargeError`
            before any model reads it.
        prefill_chunk_size: a prefill longer than this runs in chunks of this many tokens
            (draft and target alike), which bounds its activations; ``None``: one pass. Passes
            that cut each layer's cache as they go (SpecKV, SnapKV, StreamingLLM at one budget)
            always run whole, where chunks would hold every layer's cache at once.

    Prompts are untrusted: message contents and plain string prompts are tokenised with special
    tokens split, so only the chat template emits control tokens. Wrap a prompt you templated
    yourself in :class:`~spec_rag.TrustedPrompt` to feed its control tokens as such.
    One engine may serve several threads at once: every request keeps its own cache.
    """

    def __init__(
        self,
        target: Any,
        tokenizer: Any,
        draft: Any = None,
        draft_tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
        prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE,
    ) -> None:
        if max_input_tokens is not None and max_input_tokens <= 0:
            raise InvalidInputError(
                f"max_input_tokens must be positive, or None for no ceiling (got {max_input_tokens})."
            )
        if prefill_chunk_size is not None and prefill_chunk_size <= 0:
            raise InvalidInputError(
                f"prefill_chunk_size must be positive, or None for one pass (got {prefill_chunk_size})."
            )
        self.max_input_tokens = max_input_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer
        self.config = config
        _check_tokenizer_fits(target, tokenizer, "target")
        # The scoring wrapper also runs chunked prefills faster on CPU (spec_rag.scoring); models
        # it cannot wrap keep their kernel.
        try_enable_scoring(target)
        info = method_info(self.method)
        if info.needs_draft:
            if draft is None:
                raise InvalidInputError(
                    f"method {info.name!r} needs a draft model: pass draft=... (and draft_tokenizer=... "
                    "if its tokenizer differs), or use SnapKVConfig / StreamingLLMConfig / config=None, "
                    "which need none."
                )
            _check_tokenizer_fits(draft, self.draft_tokenizer, "draft")
        self.shared_vocabulary = draft is not None and same_vocabulary(tokenizer, self.draft_tokenizer)
        models = Models(
            target,
            tokenizer,
            draft,
            self.draft_tokenizer,
            shared_vocabulary=self.shared_vocabulary,
            target_eos=eos_ids(target, tokenizer),
            draft_eos=eos_ids(draft, self.draft_tokenizer) if draft is not None else [],
            max_input_tokens=max_input_tokens,
            prefill_chunk_size=prefill_chunk_size,
        )
        self._target_eos = models.target_eos
        self._method: Method = build_method(config, models)

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        config: EngineConfig | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        max_input_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
        prefill_chunk_size: int | None = PREFILL_CHUNK_SIZE,
    ) -> SpecEngine:
        """Load (or reuse, from the process-wide model cache) target and draft by name or path."""
        from spec_rag.models import get_model

        target_model, target_tokenizer = get_model(target, dtype=dtype, device=device)
        draft_model = draft_tokenizer = None
        if draft is not None:
            draft_model, draft_tokenizer = get_model(draft, dtype=dtype, device=device)
        return cls(
            target_model,
            target_tokenizer,
            draft_model,
            draft_tokenizer,
            config,
            max_input_tokens=max_input_tokens,
            prefill_chunk_size=prefill_chunk_size,
        )

    def with_config(self, config: EngineConfig | None) -> SpecEngine:
        """The same models under another method or budget (no reload)."""
        return SpecEngine(
            self.target,
            self.tokenizer,
            self.draft,
            self.draft_tokenizer,
            config,
            max_input_tokens=self.max_input_tokens,
            prefill_chunk_size=self.prefill_chunk_size,
        )

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
        tools: Sequence[Mapping[str, Any]] | None = ...,
        tool_choice: str | Mapping[str, Any] | None = ...,
        response_format: ResponseFormat | None = ...,
        constraint: Constraint | None = ...,
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
        tools: Sequence[Mapping[str, Any]] | None = ...,
        tool_choice: str | Mapping[str, Any] | None = ...,
        response_format: ResponseFormat | None = ...,
        constraint: Constraint | None = ...,
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
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | None = None,
        constraint: Constraint | None = None,
    ) -> Generation | list[Generation]:
        """Answer one prompt (a string fed as-is, or chat messages) or a list of prompts.

        ``temperature`` 0 is greedy. ``stop`` strings end the answer (not included).
        A list of prompts is answered one by one and gives a list of generations.
        """
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
        structure = self._structure(tools, tool_choice, response_format, constraint)
        if _is_batch(prompt):
            return [self._complete(p, params, structure) for p in prompt]  # type: ignore[arg-type]
        return self._complete(prompt, params, structure)  # type: ignore[arg-type]

    generate.__doc__ = (generate.__doc__ or "") + _STRUCTURE_DOC

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
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | None = None,
        constraint: Constraint | None = None,
    ) -> GenerationStream:
        """Yield the answer as text deltas while it is generated (see :class:`GenerationStream`).

        With tools, the deltas are the content only: text from a tool call's opening tag on is
        held back, and the calls are in ``stream.generation.tool_calls`` at the end."""
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
        return self._stream(prompt, params, self._structure(tools, tool_choice, response_format, constraint))

    # -- one scoring, many budgets ---------------------------------------------------------
    def score(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        lookahead: Sequence[int] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | None = None,
        constraint: Constraint | None = None,
    ) -> ScoredPrompt:
        """Do the method's budget-free work on ``prompt`` once (the draft's pass, the target's
        scoring prefill); :meth:`generate_from` then answers from it at any budget.

        ``max_new_tokens`` sets SpecKV's default lookahead length (the answer's length).
        ``lookahead`` (target token ids) replaces the draft's own lookahead, e.g. one written by
        another pass; it is used as given. ``tools`` are rendered with the prompt (as in
        :meth:`generate`); :meth:`generate_from` then parses the calls against them.
        ``tool_choice``, ``response_format`` and ``constraint`` are as in :meth:`generate`: the
        draft writes its lookahead under the answer's grammar (so the target can accept it), and
        :meth:`generate_from` answers under the same grammar unless it is given another.

        Example, a budget sweep at the cost of one scoring pass::

            scored = engine.score(prompt, max_new_tokens=64)
            answers = {c: engine.generate_from(scored, budget=c, max_new_tokens=64) for c in (128, 256)}
        """
        check_prompt(prompt)
        structure = self._structure(tools, tool_choice, response_format, constraint)
        prompt = self._with_tools(prompt, structure)
        stats = GenerationStats(method=self.method)
        request = Request(
            prompt,
            max_new_tokens,
            stats,
            None if lookahead is None else list(lookahead),
            guide=structure.guide if structure.guided else None,
        )
        scored = self._method.score(request)
        scored.tools = structure.tools
        given = {"tool_choice": tool_choice, "response_format": response_format, "constraint": constraint}
        scored.answer_format = {k: v for k, v in given.items() if v is not None}
        return scored

    def generate_from(
        self,
        scored: ScoredPrompt,
        *,
        budget: int | None = None,
        max_new_tokens: int = 256,
        temperature: float | None = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: ResponseFormat | None = None,
        constraint: Constraint | None = None,
    ) -> Generation:
        """Answer from a :meth:`score` result at ``budget`` (``None``: the config's budget): the
        same answer as :meth:`generate` under a config with that budget, without scoring again
        (SpecKV at a budget that holds the whole prompt is the one exception: alone it skips the
        draft, here the prompt's entries come from the scoring prefill, equal up to rounding).

        ``scored`` stays unchanged, so any number of budgets may be answered from it. The stats
        count the scoring's cost as this answer's own. Full inference and StreamingLLM also
        answer from another method's scoring of the same prompt (they need its cache only).
        The tools are those the prompt was scored with (``score(prompt, tools=...)``);
        ``tool_choice``, ``response_format`` and ``constraint`` are as in :meth:`generate`, and
        default to those the prompt was scored with. Given here instead, the draft's lookahead
        (written under the scoring's grammar, or none) is accepted only as far as this one allows.
        """
        params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if tool_choice is None and response_format is None and constraint is None:
            tool_choice = scored.answer_format.get("tool_choice")
            response_format = scored.answer_format.get("response_format")
            constraint = scored.answer_format.get("constraint")
        structure = self._structure(scored.tools, tool_choice, response_format, constraint)
        guide = structure.guide()
        accept = guide.count_accepted if guide is not None else None
        method = self._method
        if not method.accepts(scored):
            raise InvalidInputError(
                f"method {self.method!r} cannot answer from a {scored.method!r} scoring: score the "
                f"prompt with this engine (engine.score(prompt)) first."
            )
        if budget is not None and self.config is None:
            raise InvalidInputError("full inference keeps the whole prompt; leave budget unset.")
        try:
            checked = method.check_budget(budget)
        except ValidationError as err:
            detail = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())
            raise InvalidInputError(
                f"budget {budget} does not fit the {self.method} settings: {detail}"
            ) from err
        stats = replace(scored.stats, method=self.method)
        spent = stats.draft_s + stats.target_prefill_s
        stream = GenerationStream(
            self,
            params,
            lambda: method.select(scored, checked, stats, greedy=params.greedy, accept=accept),
            stats,
            structure,
            guide,
        )
        return self._drain(stream, spent)

    # -- the pipeline ----------------------------------------------------------------------
    def _complete(self, prompt: Prompt, params: SamplingParams, structure: _Structure) -> Generation:
        return self._drain(self._stream(prompt, params, structure))

    def _stream(self, prompt: Prompt, params: SamplingParams, structure: _Structure) -> GenerationStream:
        check_prompt(prompt)
        prompt = self._with_tools(prompt, structure)
        stats = GenerationStats(method=self.method)
        guide = structure.guide()
        # A sampled answer's one sampler: it draws the verified lookahead, then the decoding.
        sampler = None if params.greedy else Sampler(params, self.target.device)
        request = Request(
            prompt,
            params.max_new_tokens,
            stats,
            greedy=params.greedy,
            accept=guide.count_accepted if guide is not None else None,
            guide=structure.guide if guide is not None else None,  # fresh guides for the draft
            sampler=sampler,
        )
        return GenerationStream(
            self, params, lambda: self._method.prefill(request), stats, structure, guide, sampler
        )

    @staticmethod
    def _with_tools(prompt: Prompt, structure: _Structure) -> Prompt:
        if not structure.tools:
            return prompt
        if isinstance(prompt, str):
            raise InvalidInputError(
                "tools are rendered by the chat template: pass chat messages "
                "([{'role': 'user', 'content': ...}]), not a string prompt."
            )
        return with_tools(list(prompt), structure.tools)

    def _structure(
        self,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        response_format: ResponseFormat | None,
        constraint: Constraint | None,
    ) -> _Structure:
        """Check the structured-output arguments and compile their grammar (cached per schema)."""
        normalized = normalize_tools(tools) if tools is not None else None
        if normalized:
            check_supports_tools(self.tokenizer)
        choice = check_tool_choice(tool_choice, normalized)
        forcing = choice not in (None, "auto", "none")
        given = [
            name
            for name, v in (("response_format", response_format), ("constraint", constraint))
            if v is not None
        ]
        if forcing:
            given.append(f"tool_choice={tool_choice!r}")
        if len(given) > 1:
            raise InvalidInputError(
                f"pass one of {' and '.join(given)}: each sets the grammar of the answer."
            )
        banned: tuple[int, ...] = ()
        if constraint is not None and not isinstance(constraint, Constraint):
            raise InvalidInputError(
                f"constraint must be a spec_rag.constrained.Constraint, got {type(constraint).__name__}"
            )
        try:
            if response_format is not None:
                constraint = Constraint.json_schema(
                    self.tokenizer, _response_schema(response_format), eos_token_ids=self._target_eos
                )
            elif forcing:
                assert normalized is not None
                chosen = (
                    normalized if choice == "required" else [t for t in normalized if tool_name(t) == choice]
                )
                constraint = Constraint.tool_call(
                    self.tokenizer,
                    chosen,
                    tags=tool_call_tags(self.tokenizer),
                    eos_token_ids=self._target_eos,
                )
        except (ValueError, TypeError) as err:
            if isinstance(err, InvalidInputError):
                raise
            raise InvalidInputError(str(err)) from err
        trigger: tuple[int, Constraint] | None = None
        if choice == "none":
            banned = _opening_tag_ids(self.tokenizer)
        elif normalized and constraint is None and choice in (None, "auto"):
            opening = _opening_tag_ids(self.tokenizer)
            if opening:  # a one-token tag: once the model opens a call, the call follows the grammar
                call = Constraint.tool_call(
                    self.tokenizer,
                    normalized,
                    tags=tool_call_tags(self.tokenizer),
                    eos_token_ids=self._target_eos,
                )
                trigger = (opening[0], call)
        return _Structure(normalized, choice, constraint, banned, trigger)

    @staticmethod
    def _drain(stream: GenerationStream, spent: float = 0.0) -> Generation:
        for _ in stream:
            pass
        assert stream.generation is not None
        stream.generation.stats.total_s += spent
        return stream.generation

    def _run(
        self,
        params: SamplingParams,
        sink: GenerationStream,
        prefill: _Prefill,
        stats: GenerationStats,
        structure: _Structure,
        guide: Guide | None,
        sampler: Sampler | None = None,
    ) -> Generator[str, None, None]:
        """validate -> the method's prefill -> decode (under the guide) -> parse tool calls."""
        start = time.perf_counter()
        if params.max_new_tokens == 0:
            stats.total_s = time.perf_counter() - start
            sink.generation = Generation(text="", finish_reason="length", stats=stats)
            return
        prefilled = prefill()
        decode_start = time.perf_counter()
        result = DecodeResult()
        tools = bool(structure.tools)
        text = TextStream(self.tokenizer, params.stop, hold_from="<tool_call>" if tools else None)
        for token in decode_tokens(
            self.target,
            prefilled.cache,
            prefilled.logits,
            next_position=prefilled.next_position,
            params=params,
            eos_token_ids=self._target_eos,
            result=result,
            accepted=prefilled.accepted,
            guide=guide,
            sampler=sampler,
        ):
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                result.finish_reason = "stop"
                break
        content, calls = text.text, list[ToolCall]()
        if tools:
            names = [tool_name(t) for t in structure.tools or []]
            content, calls = parse_tool_calls(text.text, self.tokenizer, tool_names=names)
            if structure.tool_choice == "none":
                calls = []
            tail = content[text.emitted :] if content.startswith(text.text[: text.emitted]) else ""
        else:
            tail = text.flush()
        if tail:
            yield tail
        now = time.perf_counter()
        stats.output_tokens = len(result.token_ids)
        stats.decode_s = now - decode_start
        stats.total_s = now - start
        sink.generation = Generation(
            text=content,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            stats=stats,
            tool_calls=calls,
        )


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


def _response_schema(response_format: ResponseFormat) -> Mapping[str, Any] | type[BaseModel]:
    """The JSON schema of ``response_format``: a schema, a pydantic model class, or OpenAI's
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` / ``{"type": "json_object"}``."""
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
            inner = response_format["json_schema"]
            return inner.get("schema", {"type": "object"})
        if kind == "json_object" and len(response_format) == 1:
            return {"type": "object"}
        return response_format
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return response_format
    raise InvalidInputError(
        "response_format must be a JSON schema (a dict) or a pydantic model class, "
        f"got {type(response_format).__name__}"
    )


def _opening_tag_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids that open a tool call in ``tokenizer``'s format when the tag is one token."""
    tags = tool_call_tags(tokenizer)
    if tags is None:
        return ()
    ids = tokenizer.encode(tags[0].strip(), add_special_tokens=False)
    return tuple(ids) if len(ids) == 1 else ()


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

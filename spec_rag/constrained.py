"""Constrained decoding: JSON schemas and tool calls as token masks for a decode loop.

A :class:`Constraint` is a grammar compiled once for one tokenizer (a JSON schema, a pydantic
model, or a choice of tool calls); it is immutable and shared by every request and thread. Each
request takes its own :class:`ConstraintState` from it and, at every step, masks the logits,
picks a token and advances:

    constraint = Constraint.json_schema(tokenizer, {"type": "object", ...})
    state = constraint.new_state()
    while not state.is_finished:
        logits = state.mask_logits(model_step(token))  # [vocab]; forbidden tokens -inf
        token = int(logits.argmax())
        state.advance(token)

The end-of-sequence token is allowed only once the JSON is complete (:attr:`ConstraintState.can_end`);
when the grammar cannot go on, EOS is the only allowed token. :meth:`ConstraintState.accepts` and
:meth:`ConstraintState.count_accepted` check drafted tokens without consuming them, and
:meth:`ConstraintState.rollback` undoes accepted ones, so a verified lookahead never keeps a token
the grammar forbids.

Why llguidance
--------------
Three maintained libraries take a JSON schema to a token mask on CPU with transformers logits:
llguidance, xgrammar and outlines(-core). ``benchmarks/grammar_overhead.py`` replays the tokens of
a valid instance of a schema with nested objects, arrays, enums and bounded fields through each,
timing mask + apply + advance per token (median over tokens of each token's best of 2-5 runs),
for SmolLM2's 49k vocabulary and a 151k Qwen-sized one. Ranges span three runs on a 2-core CPU
shared with other jobs (load average 12-17), so only the orders of magnitude are firm:

=============  ==================  ===================  ======================  ==============
library        per token, 49k      per token, 151k      compile, 49k / 151k     install
=============  ==================  ===================  ======================  ==============
llguidance     0.12-0.18 ms        0.29-0.63 ms         37-76 ms / 46-87 ms     3 MB, no deps
xgrammar       0.07-0.12 ms        0.28-0.60 ms         39-125 / 238-700 ms     needs triton
outlines-core  0.07-0.10 ms        0.14-27 ms           3.3-3.9 s / 13-18 s     8 packages
=============  ==================  ===================  ======================  ==============

A step of SmolLM2-135M on that CPU took 1.2-2.2 s at best (an idle CPU does it in tens of
milliseconds), so a mask costs well under a percent of a model step, and at most a few percent
on a fast machine, with any of the three. Greedy and sampled SmolLM2 outputs under llguidance
and xgrammar all finished, parsed and validated within 90 tokens; under outlines the greedy one
did and the sampled one had not finished (unconstrained, SmolLM2 writes invalid JSON for the same
prompt). llguidance is the choice because the rest differs: its compile is the
cheapest (the lexer is built lazily, a per-request schema costs milliseconds and a new request a
~10 µs copy of the compiled matcher), while outlines builds a regex index over the whole
vocabulary per schema (seconds) and maps tokens through decoded strings (losing partial UTF-8
tokens); it is one 3 MB wheel with no Python dependencies, while xgrammar requires triton (a 286
MB wheel) on Linux; its Lark grammars embed JSON schemas (tool calls wrapped in a template's
tags); it rolls back and forces canonical tokenization of fixed text. llguidance writes object
keys in the schema's order.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
from pydantic import BaseModel

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Constraint", "ConstraintState", "Guide", "tool_call_schema"]

# Compact, fixed formatting (", " and ": " as json.dumps writes): no free whitespace, so a model
# cannot stall in an endless run of spaces or newlines, and outputs look like the chat templates'.
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_lock = threading.Lock()
# One llguidance tokenizer per (tokenizer, EOS ids): building it reads the whole vocabulary (~1 s).
_tokenizers: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)
# One compiled constraint per (tokenizer, EOS ids, grammar).
_constraints: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], str], Constraint]] = (
    weakref.WeakKeyDictionary()
)


def _eos_ids(tokenizer: Any, eos_token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_id
        if eos_token_ids is None:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids= (the model's EOS ids)")
    ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
    if not ids:
        raise ValueError("eos_token_ids is empty; pass at least one id that ends generation")
    return ids


def _ll_tokenizer(tokenizer: Any, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    with _lock:
        cached = _tokenizers.setdefault(tokenizer, {}).get(eos)
    if cached is not None:
        return cached
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "constrained decoding needs a fast (Rust) Hugging Face tokenizer, got "
            f"{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    built = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos))
    with _lock:
        return _tokenizers[tokenizer].setdefault(eos, built)


def _schema_dict(schema: Mapping[str, Any] | type[BaseModel]) -> dict[str, Any]:
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, Mapping):
        return dict(schema)
    raise TypeError(
        f"schema must be a JSON schema (a dict) or a pydantic model class, got {type(schema).__name__}"
    )


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that leaves it open.

    Every output valid for the closed schema is valid for the original; closing it keeps a model
    from wandering into invented keys that never end.
    """
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    kind = schema.get("type")
    if (
        kind == "object" or (isinstance(kind, list) and "object" in kind)
    ) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _tool_name_and_parameters(tool: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Reads OpenAI's ``{"type": "function", "function": {...}}`` or a bare ``{"name", "parameters"}``."""
    spec = tool.get("function", tool)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(
            f"a tool must be {{'name': str, 'parameters': <JSON schema>}} or "
            f"{{'type': 'function', 'function': {{...}}}}, got {dict(tool)!r}"
        )
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return spec["name"], _schema_dict(parameters)


def tool_call_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of one of ``tools``: ``{"name": <a tool's name>, "arguments": {...}}``
    with the arguments valid for that tool's parameters."""
    if not tools:
        raise ValueError("tools is empty; pass at least one tool to call")
    calls = []
    for tool in tools:
        name, parameters = _tool_name_and_parameters(tool)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _lark_literal(tokenizer: Any, text: str) -> str:
    """``text`` as a sequence of Lark items: each added token of the tokenizer in it (a special
    token, or one like Qwen's ``<tool_call>`` that is not special) as a reference to that token,
    the rest as strings. llguidance reads every added token as one token, never as its letters."""
    added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items() if token.content}
    if not added:
        return json.dumps(text)
    pattern = re.compile("|".join(re.escape(content) for content in sorted(added, key=len, reverse=True)))
    items: list[str] = []
    cursor = 0
    for match in pattern.finditer(text):
        if match.start() > cursor:
            items.append(json.dumps(text[cursor : match.start()]))
        items.append(f"<[{added[match.group()]}]>")
        cursor = match.end()
    if cursor < len(text):
        items.append(json.dumps(text[cursor:]))
    return " ".join(items) or json.dumps(text)


class Constraint:
    """A grammar compiled for one tokenizer; immutable, shared by every request and thread.

    Build it with :meth:`json_schema` or :meth:`tool_call` (both cached per tokenizer and
    grammar), then take one :meth:`new_state` per request.
    """

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str, eos_token_ids: tuple[int, ...]):
        error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
        if error:
            raise ValueError(
                f"the schema or grammar cannot be compiled: {error}. Remove or rewrite the keyword it names."
            )
        self.eos_token_ids = eos_token_ids
        #: Size of the tokenizer's vocabulary, which the masks cover; a model's may be larger.
        self.vocab_size: int = ll_tokenizer.vocab_size
        self._grammar = grammar
        self._template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)  # builds the lexer once
        if self._template.is_error():
            raise ValueError(f"the grammar cannot be compiled: {self._template.get_error()}")
        self._template_lock = threading.Lock()

    @classmethod
    def _cached(cls, tokenizer: Any, grammar: str, eos_token_ids: int | Sequence[int] | None) -> Constraint:
        eos = _eos_ids(tokenizer, eos_token_ids)
        with _lock:
            cached = _constraints.setdefault(tokenizer, {}).get((eos, grammar))
        if cached is not None:
            return cached
        built = cls(_ll_tokenizer(tokenizer, eos), grammar, eos)
        with _lock:
            return _constraints[tokenizer].setdefault((eos, grammar), built)

    @classmethod
    def json_schema(
        cls,
        tokenizer: Any,
        schema: Mapping[str, Any] | type[BaseModel],
        *,
        strict: bool = True,
        eos_token_ids: int | Sequence[int] | None = None,
    ) -> Constraint:
        """Outputs that are one JSON value valid for ``schema`` (a JSON schema dict or a pydantic
        model class), formatted as ``json.dumps`` does. ``strict`` (the default) allows no keys
        beyond an object's ``properties`` unless its schema says otherwise, as OpenAI's strict
        structured outputs do. ``eos_token_ids`` defaults to the tokenizer's EOS."""
        schema = _closed(_schema_dict(schema)) if strict else _schema_dict(schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        return cls._cached(tokenizer, grammar, eos_token_ids)

    @classmethod
    def tool_call(
        cls,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]],
        *,
        tags: tuple[str, str] | None = None,
        strict: bool = True,
        eos_token_ids: int | Sequence[int] | None = None,
    ) -> Constraint:
        """Outputs that call one of ``tools`` (JSON-schema tools, OpenAI's format or bare
        ``{"name", "description", "parameters"}``): ``{"name": ..., "arguments": {...}}`` (see
        :func:`tool_call_schema`), wrapped in ``tags`` when given, e.g.
        ``("<tool_call>\\n", "\\n</tool_call>")`` as Qwen2.5's template writes calls. An added
        token of the tokenizer inside a tag (special or not) is matched as that token. ``strict`` as in
        :meth:`json_schema`."""
        schema = _closed(tool_call_schema(tools)) if strict else tool_call_schema(tools)
        schema = {**schema, "x-guidance": _JSON_OPTIONS}
        if tags is None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        else:
            opening, closing = (_lark_literal(tokenizer, tag) for tag in tags)
            lark = f"start: {opening} call {closing}\ncall: %json {json.dumps(schema)}"
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        return cls._cached(tokenizer, grammar, eos_token_ids)

    @classmethod
    def lark(
        cls, tokenizer: Any, grammar: str, *, eos_token_ids: int | Sequence[int] | None = None
    ) -> Constraint:
        """Outputs of a Lark grammar in llguidance's dialect (``start: ...``; ``%json {...}``
        embeds a JSON schema, ``<[id]>`` names a token), e.g. ``'start: "Answer: " /[0-9]+/'``."""
        return cls._cached(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), eos_token_ids)

    def new_state(self) -> ConstraintState:
        """A fresh state for one request (a copy of the compiled matcher: microseconds)."""
        with self._template_lock:
            matcher = self._template.deep_copy()
        return ConstraintState(self, matcher)


class ConstraintState:
    """Where one request stands in a :class:`Constraint`'s grammar. Not shared between requests:
    each request takes its own from :meth:`Constraint.new_state`."""

    def __init__(self, constraint: Constraint, matcher: llguidance.LLMatcher) -> None:
        self.constraint = constraint
        self._matcher = matcher
        self._ended = False  # EOS consumed
        self._allowed: torch.Tensor | None = None  # [tokenizer vocab] bool, for the current position

    def allowed(self) -> torch.Tensor:
        """Which tokens the grammar allows next: ``[tokenizer vocab]`` bool, on the CPU.

        Where the grammar forces text (a key's name, say) only the tokenizer's canonical tokens
        for it are allowed, so constrained outputs tokenize as the model was trained to see them.
        """
        if self._allowed is None:
            bias = self._matcher.compute_logit_bias()  # one byte per token: 0 forbidden, 200 allowed
            if self._matcher.is_error():
                raise RuntimeError(f"the constraint is in an error state: {self._matcher.get_error()}")
            self._allowed = torch.frombuffer(bytearray(bias), dtype=torch.uint8).bool()
        return self._allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (``[..., vocab]``) with every token the grammar forbids set to -inf; a new
        tensor. Rows past the tokenizer's vocabulary (a model's padded embedding) are forbidden."""
        allowed = self.allowed()  # [tokenizer vocab]
        vocab = logits.shape[-1]
        if vocab >= allowed.shape[0]:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[0]))  # [vocab]
        else:
            allowed = allowed[:vocab]
            if not allowed.any():
                raise ValueError(
                    f"every token the grammar allows lies past the logits' {vocab} entries; the logits "
                    f"must cover the tokenizer's {self.constraint.vocab_size} tokens"
                )
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accepts(self, token_id: int) -> bool:
        """Whether :meth:`mask_logits` allows ``token_id`` next (the state does not move)."""
        token = int(token_id)
        return not self._ended and 0 <= token < self.constraint.vocab_size and bool(self.allowed()[token])

    def count_accepted(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` (a drafted continuation) the grammar accepts in a row from
        here, each where :meth:`mask_logits` would allow it; the state does not move.

        The tokens are tried on a copy of the matcher (microseconds), not consumed and rolled
        back: llguidance 1.9 can serve a stale mask after a rollback past a mask it computed."""
        accepted = 0
        trial = ConstraintState(self.constraint, self._matcher.deep_copy())
        trial._allowed, trial._ended = self._allowed, self._ended
        for token in token_ids:
            if not trial.accepts(token):
                break
            accepted += 1
            if int(token) in self.constraint.eos_token_ids:
                break
            trial._consume(int(token))
        return accepted

    def advance(self, token_id: int) -> None:
        """Consume ``token_id``. Raises ``ValueError`` if the grammar forbids it (mask the logits
        first, or check drafted tokens with :meth:`accepts`)."""
        if not self.accepts(token_id):
            raise ValueError(
                f"token {token_id} is not allowed by the constraint here; pick tokens from mask_logits()"
            )
        self._consume(int(token_id))
        self._ended = int(token_id) in self.constraint.eos_token_ids

    def _consume(self, token: int) -> None:
        self._allowed = None
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the constraint failed to consume token {token}: {self._matcher.get_error()}")

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` advances (drafted tokens the target model rejected)."""
        if not num_tokens:
            return
        if not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")
        self._allowed = None
        self._ended = False

    @property
    def can_end(self) -> bool:
        """Whether the output so far is complete, so EOS is allowed."""
        return self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Whether generation must stop: EOS was consumed, or the output is complete and the
        grammar allows nothing more (the caller may then emit EOS or stop)."""
        return self._ended or self._matcher.is_stopped()


class Guide:
    """What a decode loop obeys for one request.

    ``state`` constrains the whole answer (a JSON schema, a forced tool call): the answer ends
    when its grammar is complete. ``banned`` token ids are never written (a tool call's opening
    tag under ``tool_choice="none"``). ``trigger`` = ``(token_id, constraint)`` is a lazy grammar:
    the answer is free until the model writes ``token_id`` (a tool call's opening tag), then the
    rest of that call follows ``constraint`` (whose grammar starts with that token); once the call
    is complete the answer is free again.
    """

    def __init__(
        self,
        state: ConstraintState | None = None,
        banned: Sequence[int] = (),
        trigger: tuple[int, Constraint] | None = None,
    ) -> None:
        self.state = state
        self.banned = sorted({int(t) for t in banned})
        self._banned_set = frozenset(self.banned)
        self.trigger = trigger

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (``[vocab]``) with every forbidden token at -inf."""
        if self.state is not None:
            logits = self.state.mask_logits(logits)
        if self.banned:
            banned = torch.tensor([t for t in self.banned if t < logits.shape[-1]], dtype=torch.long)
            logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
        return logits

    def count_accepted(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` (drafted) may be written in a row from here; nothing moves."""
        tokens = [int(t) for t in token_ids]
        for index, token in enumerate(tokens):
            if token in self._banned_set:
                tokens = tokens[:index]
                break
        if self.state is not None:
            return self.state.count_accepted(tokens)
        if self.trigger is None or self.trigger[0] not in tokens:
            return len(tokens)
        opening = tokens.index(self.trigger[0])  # free text, then a call under the grammar
        call = self.trigger[1].new_state()
        call.advance(tokens[opening])
        return opening + 1 + call.count_accepted(tokens[opening + 1 :])

    def advance(self, token_id: int) -> None:
        if self.state is not None:
            self.state.advance(token_id)
            if self.trigger is not None and self.state.is_finished:
                self.state = None  # the call is complete: free again
        elif self.trigger is not None and int(token_id) == self.trigger[0]:
            self.state = self.trigger[1].new_state()
            self.state.advance(token_id)

    @property
    def is_finished(self) -> bool:
        """The answer's grammar is complete and allows nothing more: stop."""
        return self.trigger is None and self.state is not None and self.state.is_finished

"""Prompt formatting and tokenisation shared by SpecPC and the engine.

Retrieved text is untrusted. Only the chat template may emit control tokens (``<|im_start|>``,
``<|eot_id|>``, ``[INST]``, ...): message contents, and plain string prompts, are tokenised with
special tokens split into ordinary text, so a document holding ``<|im_end|><|im_start|>system``
cannot close the user's turn and open a forged one. :class:`TrustedPrompt` opts a text out.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from spec_rag.errors import ContextLengthError, InputTooLargeError, InvalidInputError
from spec_rag.tools import check_supports_tools, normalize_tools

Messages = Sequence[Mapping[str, Any]]
Prompt = str | Messages
Span = tuple[int, int]

#: Default ceiling on a request's prompt tokens. 128k is the longest context of the models
#: spec-rag targets (Llama-3.1, Qwen3 with YaRN), so no prompt a supported model can read is
#: refused, while a runaway request (millions of tokens of retrieved text) is refused before it
#: is tokenised, let alone prefilled.
DEFAULT_MAX_INPUT_TOKENS = 131_072
#: Characters per token above which a text is refused before tokenisation. Natural text and code
#: average 3-6 characters per token; 32 leaves room for long whitespace or symbol runs.
CHARS_PER_TOKEN_BOUND = 32


class TrustedPrompt(str):
    """A prompt string (or message content) whose special-token text is meant as control tokens.

    Plain strings and message contents are untrusted by default: ``<|im_start|>`` written in
    them is tokenised as the characters ``<``, ``|``, ``im``, ... Wrap a text you templated
    yourself, e.g. ``TrustedPrompt(tokenizer.apply_chat_template(...))``, to feed its control
    tokens as such. Never wrap retrieved or user-supplied text.
    """

    __slots__ = ()


def trusted(prompt: Prompt) -> Prompt:
    """``prompt`` with every text marked :class:`TrustedPrompt` (a string, or each message's content)."""
    if isinstance(prompt, str):
        return TrustedPrompt(prompt)
    return with_tools(
        [
            {**m, "content": TrustedPrompt(m["content"])} if isinstance(m.get("content"), str) else dict(m)
            for m in prompt
        ],
        prompt_tools(prompt),
    )


class ChatWithTools(list):  # type: ignore[type-arg]
    """Chat messages together with the tools the chat template renders beside them.

    A list of message dicts like any chat prompt, so every stage that renders the prompt (the
    draft's pass, SpecPC's cut, the target's prefill) renders the same tools.
    """

    def __init__(self, messages: Messages, tools: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(messages)
        self.tools: list[dict[str, Any]] = [dict(t) for t in tools]


def with_tools(messages: Messages, tools: Sequence[Mapping[str, Any]] | None) -> list[Any]:
    """``messages`` carrying ``tools`` (a :class:`ChatWithTools`), or a plain list without tools."""
    return ChatWithTools(messages, tools) if tools else list(messages)


def prompt_tools(prompt: Any) -> list[dict[str, Any]] | None:
    """The tools a prompt carries (see :class:`ChatWithTools`), ``None`` if none."""
    tools = getattr(prompt, "tools", None)
    return tools or None


def has_tool_structure(prompt: Any) -> bool:
    """Whether a prompt's rendering holds tool structure: tools, calls or tool results."""
    if isinstance(prompt, str) or not is_messages(prompt):
        return False
    return bool(prompt_tools(prompt)) or any(m.get("role") == "tool" or m.get("tool_calls") for m in prompt)


def is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in prompt)
    )


def check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidInputError("the prompt is empty; pass the text (or chat messages) to answer.")
        return
    if not is_messages(prompt):
        raise InvalidInputError(
            "a prompt must be a string or a list of chat messages like "
            f"[{{'role': 'user', 'content': '...'}}]; got {type(prompt).__name__}."
        )
    if not any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in prompt):
        raise InvalidInputError("every chat message is empty; pass the text to answer.")


def check_input_chars(chars: int, max_tokens: int | None) -> None:
    """Refuse a text too long to be worth tokenising (cheap: before any tokenisation)."""
    if max_tokens is not None and chars > max_tokens * CHARS_PER_TOKEN_BOUND:
        raise InputTooLargeError(
            f"the prompt has {chars} characters, more than max_input_tokens ({max_tokens}) tokens "
            f"can hold (at most {CHARS_PER_TOKEN_BOUND} characters per token). Retrieve fewer or "
            "shorter documents, or raise max_input_tokens if the machine can hold such a prompt."
        )


def check_input_tokens(tokens: int, max_tokens: int | None) -> None:
    """Refuse a tokenised prompt above the ceiling (right after tokenisation, before any forward)."""
    if max_tokens is not None and tokens > max_tokens:
        raise InputTooLargeError(
            f"the prompt has {tokens} tokens, more than max_input_tokens ({max_tokens}). Retrieve "
            "fewer or shorter documents, or raise max_input_tokens if the machine can hold such a prompt."
        )


def render_prompt(
    tokenizer: Any, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None
) -> tuple[str, list[Span]]:
    """The exact text the model is fed, and the character spans of its untrusted content.

    A string is fed as-is and is all content (none if it is a :class:`TrustedPrompt`); messages
    go through the chat template, and each message's content (unless trusted) is content, the
    rest is the template's structure. ``tools`` (default: those the prompt carries, see
    :class:`ChatWithTools`) are rendered by the template as trusted structure; the arguments of
    the assistant's earlier tool calls are content, like tool results.
    """
    check_prompt(prompt)
    tools = tools if tools is not None else prompt_tools(prompt)
    if isinstance(prompt, str):
        if tools:
            raise InvalidInputError(
                "tools are rendered by the chat template: pass chat messages "
                "([{'role': 'user', 'content': ...}]), not a string prompt."
            )
        return str(prompt), ([] if isinstance(prompt, TrustedPrompt) else [(0, len(prompt))])
    messages = [_normalize_message(m) for m in prompt]
    if tools or has_tool_structure(messages):
        check_supports_tools(tokenizer)
    rendered_tools = normalize_tools(tools) if tools else None
    contents = [m.get("content") for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, messages, contents, rendered_tools)
    # No template: a plain transcript the model can still continue.
    text, spans = "", []
    for m in messages:
        text += f"{m['role']}: "
        content = str(m.get("content") or "")
        if not isinstance(m.get("content"), TrustedPrompt):
            spans.append((len(text), len(text) + len(content)))
        text += content + "\n"
    return text + "assistant:", spans


def format_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model is fed: a string as given, messages through the chat template."""
    return render_prompt(tokenizer, prompt)[0]


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: tool calls' arguments as dicts (OpenAI sends them
    as JSON strings, which a template's ``tojson`` would quote a second time)."""
    out = dict(message)
    calls = out.get("tool_calls")
    if not calls:
        return out
    if out.get("content") is None:
        out["content"] = ""
    normalized = []
    for call in calls:
        call = dict(call)
        function = dict(call.get("function", call))
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as err:
                raise InvalidInputError(
                    f"a tool call's arguments must be a JSON object (or its JSON text), got {arguments!r}"
                ) from err
        function["arguments"] = arguments
        if "function" in call:
            call["function"] = function
            call.setdefault("type", "function")
        else:
            call = {"id": call.get("id"), "type": "function", "function": function}
        normalized.append(call)
    out["tool_calls"] = normalized
    return out


def _apply_template(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs))


def call_argument_spans(text: str, messages: Messages) -> list[Span]:
    """Where the earlier tool calls' arguments appear in ``text`` (in order; as ``tojson`` writes
    them): text the model wrote from retrieved content, so untrusted."""
    spans: list[Span] = []
    cursor = 0
    for message in messages:
        for call in _normalize_message(message).get("tool_calls") or []:
            arguments = call.get("function", call).get("arguments")
            if not arguments:
                continue
            for rendering in (json.dumps(arguments, ensure_ascii=False), json.dumps(arguments)):
                start = text.find(rendering, cursor)
                if start >= 0:
                    spans.append((start, start + len(rendering)))
                    cursor = start + len(rendering)
                    break
    return spans


def _render_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    contents: list[Any],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[Span]]:
    text, spans = _render_contents(tokenizer, messages, contents, tools)
    if any(m.get("tool_calls") for m in messages):
        spans = sorted(spans + call_argument_spans(text, messages))
    return text, spans


def _render_contents(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    contents: list[Any],
    tools: list[dict[str, Any]] | None,
) -> tuple[str, list[Span]]:
    """Render the chat template and find each content in it.

    The template is rendered a second time with a unique marker in place of each string
    content; the text between markers is the template's. The real rendering is then matched
    piece by piece: template text, content (as given, or trimmed as many templates do),
    template text, ... If the template rewrites content some other way, the marker rendering
    with each content put back verbatim is the prompt.
    """
    real = _apply_template(tokenizer, messages, tools)
    nonce = secrets.token_hex(6)
    probe = [  # empty contents hold nothing to protect, and templates may test them ("if content")
        {**m, "content": f"\ue000{nonce}:{i}\ue001"} if isinstance(c, str) and c else m
        for i, (m, c) in enumerate(zip(messages, contents, strict=True))
    ]
    try:
        marked = _apply_template(tokenizer, probe, tools)
    except Exception:  # a template that inspects its contents: find each content in order
        return real, _find_in_order(real, contents)
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", marked)  # [template, index, template, ...]
    templates, owners = parts[0::2], [int(i) for i in parts[1::2]]
    spans = _match_rendering(real, templates, [contents[i] for i in owners])
    if spans is None:  # rewritten content: put it back verbatim into the template's text
        spans, real = [], templates[0]
        for i, tail in zip(owners, templates[1:], strict=True):
            spans.append((len(real), len(real) + len(contents[i])))
            real += contents[i] + tail
    trusted_owner = [isinstance(contents[i], TrustedPrompt) for i in owners]
    return real, [span for span, t in zip(spans, trusted_owner, strict=True) if not t and span[1] > span[0]]


def _match_rendering(text: str, templates: list[str], contents: list[str]) -> list[Span] | None:
    """Spans of ``contents`` in ``text`` == ``templates[0] + c0 + templates[1] + c1 + ...``, where each
    content may appear trimmed; ``None`` if ``text`` is not of that form."""
    spans: list[Span] = []
    pos = 0
    for k, content in enumerate(contents):
        if not text.startswith(templates[k], pos):
            return None
        pos += len(templates[k])
        after = templates[k + 1]
        last = k + 1 == len(contents)
        for candidate in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            end = pos + len(candidate)
            fits = text.startswith(candidate, pos) and text.startswith(after, end)
            if fits and (not last or end + len(after) == len(text)):
                break
        else:
            return None
        spans.append((pos, end))
        pos = end
    return spans if text.startswith(templates[-1], pos) and pos + len(templates[-1]) == len(text) else None


def _find_in_order(text: str, contents: list[Any]) -> list[Span]:
    spans: list[Span] = []
    cursor = 0
    for content in contents:
        if not isinstance(content, str) or isinstance(content, TrustedPrompt) or not content:
            continue
        start = text.find(content, cursor)
        if start >= 0:
            spans.append((start, start + len(content)))
            cursor = start + len(content)
    return spans


class _TokenizerExtras:
    """What safe encoding needs of one tokenizer: its control token ids and a copy of its backend
    that splits special tokens (the tokenizer's own ``split_special_tokens`` flips shared state,
    which races when several threads share the tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.size = len(tokenizer)
        control = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(token, "special", False):
                control.add(int(token_id))
        self.control = frozenset(control)
        self.splitter: Tokenizer | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(tokenizer, "is_fast", False):
            self.splitter = Tokenizer.from_str(backend.to_str())
            self.splitter.no_truncation()
            self.splitter.no_padding()
            self.splitter.encode_special_tokens = True


_EXTRAS: weakref.WeakKeyDictionary[Any, _TokenizerExtras] = weakref.WeakKeyDictionary()
_EXTRAS_LOCK = threading.Lock()


def _extras(tokenizer: Any) -> _TokenizerExtras:
    with _EXTRAS_LOCK:
        extras = _EXTRAS.get(tokenizer)
        if extras is None or extras.size != len(tokenizer):  # tokens added since: rebuild
            extras = _EXTRAS[tokenizer] = _TokenizerExtras(tokenizer)
        return extras


def control_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special (control) tokens: turn markers, BOS/EOS, padding."""
    return _extras(tokenizer).control


def _split_encode(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """``text`` tokenised with special tokens split into ordinary tokens; offsets into ``text``."""
    splitter = _extras(tokenizer).splitter
    if splitter is not None:
        enc = splitter.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]  # type: ignore[misc]
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(ids), []


def encode_text(
    tokenizer: Any,
    text: str,
    content: Sequence[Span],
    *,
    add_special_tokens: bool,
    offsets: bool = False,
    max_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
) -> dict[str, Any]:
    """Tokenise ``text`` where ``content`` (character spans) is untrusted text.

    Special-token text inside ``content`` becomes ordinary tokens; only the rest (the chat
    template) may hold control tokens. The text is tokenised whole and, only where a control
    token came out of content, the run of text between the template's own control tokens
    around it is tokenised again with special tokens split, so benign prompts keep exactly the
    ids a whole-text tokenisation gives. ``max_tokens`` is the ceiling of
    :func:`check_input_tokens`.

    Returns ``input_ids`` ``[L]``, ``template_mask`` ``[L]`` (bool: the template's control tokens)
    and, with ``offsets``, the character span of each token in ``text``.
    """
    check_input_chars(len(text), max_tokens)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=fast,
        return_attention_mask=False,
    )
    ids: list[int] = list(enc["input_ids"])
    spans: list[Span] = [tuple(o) for o in enc["offset_mapping"]] if fast else []  # type: ignore[misc]
    control = control_token_ids(tokenizer)
    if content and control:
        if fast:
            ids, spans = _resplit_forged(tokenizer, ids, spans, text, content, control)
        elif any(t in control for t in ids):
            ids = _encode_pieces(tokenizer, text, content, add_special_tokens)
    check_input_tokens(len(ids), max_tokens)
    if not ids:
        raise InvalidInputError("the prompt has no tokens after tokenisation; pass some text.")
    input_ids = torch.tensor(ids, dtype=torch.long)  # [L]
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "template_mask": torch.isin(input_ids, torch.tensor(sorted(control), dtype=torch.long)),
    }
    if offsets:
        if not fast:
            raise InvalidInputError("character offsets need a fast tokenizer; load it with use_fast=True.")
        out["offsets"] = spans
    return out


def _overlaps(span: Span, content: Sequence[Span]) -> bool:
    start, end = span
    return end > start and any(start < c_end and end > c_start for c_start, c_end in content)


def _resplit_forged(
    tokenizer: Any,
    ids: list[int],
    spans: list[Span],
    text: str,
    content: Sequence[Span],
    control: frozenset[int],
) -> tuple[list[int], list[Span]]:
    forged = [t in control and _overlaps(s, content) for t, s in zip(ids, spans, strict=True)]
    if not any(forged):
        return ids, spans
    template = [t in control and not f for t, f in zip(ids, forged, strict=True)]
    out_ids: list[int] = []
    out_spans: list[Span] = []
    i = 0
    while i < len(ids):
        if template[i]:
            out_ids.append(ids[i])
            out_spans.append(spans[i])
            i += 1
            continue
        j = i
        while j < len(ids) and not template[j]:
            j += 1
        # ids[i:j] is a run between two of the template's control tokens
        if any(forged[i:j]):
            widths = [s for s in spans[i:j] if s[1] > s[0]]
            start, end = min(s for s, _ in widths), max(e for _, e in widths)
            run_ids, run_spans = _split_encode(tokenizer, text[start:end])
            out_ids += run_ids
            out_spans += [(s + start, e + start) for s, e in run_spans]
        else:
            out_ids += ids[i:j]
            out_spans += spans[i:j]
        i = j
    return out_ids, out_spans


def _encode_pieces(tokenizer: Any, text: str, content: Sequence[Span], add_special_tokens: bool) -> list[int]:
    """Slow tokenizers (no offsets): template pieces as they are, content pieces split."""
    ids: list[int] = []
    if add_special_tokens:
        ids += tokenizer.build_inputs_with_special_tokens([])
    cursor = 0
    for start, end in [*sorted(content), (len(text), len(text))]:
        if start > cursor:
            ids += tokenizer(text[cursor:start], add_special_tokens=False)["input_ids"]
        if end > start:
            ids += _split_encode(tokenizer, text[start:end])[0]
        cursor = max(cursor, end)
    return ids


def encode(
    tokenizer: Any,
    text: str,
    *,
    templated: bool,
    offsets: bool = False,
    trusted: bool = False,
    max_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
) -> dict[str, Any]:
    """Tokenise ``text``, all of it untrusted content unless ``trusted`` (or a :class:`TrustedPrompt`).

    ``templated`` texts get no added BOS/EOS (a chat template writes its own).
    """
    trusted = trusted or isinstance(text, TrustedPrompt)
    content = [] if trusted else [(0, len(text))]
    return encode_text(
        tokenizer, text, content, add_special_tokens=not templated, offsets=offsets, max_tokens=max_tokens
    )


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    offsets: bool = False,
    max_tokens: int | None = DEFAULT_MAX_INPUT_TOKENS,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Render and tokenise a prompt (see :func:`render_prompt` and :func:`encode_text`); the
    rendered text is ``out["text"]``, the character spans of its untrusted content
    ``out["content"]``."""
    check_prompt(prompt)
    if isinstance(prompt, str):
        check_input_chars(len(prompt), max_tokens)
    else:
        check_input_chars(sum(len(str(m.get("content") or "")) for m in prompt), max_tokens)
    text, content = render_prompt(tokenizer, prompt, tools=tools)
    out = encode_text(
        tokenizer,
        text,
        content,
        add_special_tokens=isinstance(prompt, str),
        offsets=offsets,
        max_tokens=max_tokens,
    )
    out["text"] = text
    out["content"] = content
    return out


def context_window(model: Any) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(model: Any, length: int, *, role: str, lookahead: int = 0) -> None:
    """Refuse a pass of ``length`` prompt tokens and ``lookahead`` tokens after them (the draft's
    lookahead, read or written) that ``model``'s context window cannot hold."""
    limit = context_window(model)
    if limit is None or length + lookahead <= limit:
        return
    if lookahead and length < limit:
        raise ContextLengthError(
            f"the prompt has {length} tokens and the draft's lookahead {lookahead} more, "
            f"{length + lookahead} in all, but the {role} model's context window is {limit}. Lower "
            f"max_new_tokens (or the method's lookahead_tokens) to {limit - length} or less, or retrieve "
            "fewer or shorter documents"
            + (" (SpecPC scores a prompt past the draft's window in chunks)." if role == "draft" else ".")
        )
    raise ContextLengthError(
        f"the prompt has {length} tokens but the {role} model's context window is {limit}. "
        "Retrieve fewer or shorter documents, compress them first (SpecPC with a draft whose "
        "context is long enough), or use a model with a longer context."
    )


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token string to the same id (ids can be handed over)."""
    if a is b:
        return True
    return bool(len(a) == len(b) and a.get_vocab() == b.get_vocab())


def text_from_spans(text: str, offsets: Sequence[tuple[int, int]], kept: Sequence[int]) -> str:
    """Rebuild text from kept tokens by character offsets, so words and whitespace survive.

    Each run of consecutive kept tokens is its exact source substring, whitespace included (a
    chat template's line breaks matter to the model); runs are joined by a space only where
    neither side already has whitespace, so the target re-tokenises into (nearly) the same tokens.
    """
    runs: list[list[int]] = []  # [start, end) character spans
    previous = -2
    for pos in kept:
        start, end = offsets[pos]
        if end > start:
            if runs and (pos == previous + 1 or start <= runs[-1][1]):
                runs[-1][1] = max(runs[-1][1], end)
            else:
                runs.append([start, end])
        previous = pos
    out = ""
    for start, end in runs:
        piece = text[start:end]
        if out and not out[-1].isspace() and not piece[0].isspace():
            out += " "
        out += piece
    return out

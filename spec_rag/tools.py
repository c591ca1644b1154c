"""Tool calling: what a chat template can render, and the calls a model wrote.

Tools are rendered by the model's own chat template (Hugging Face's ``tools=`` argument), so the
model sees them exactly as it was trained to. The model writes a call in its template's format;
for Qwen2.5 and Hermes-style templates that is::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:func:`parse_tool_calls` takes such blocks out of the answer; :func:`tool_call_tags` says which
tags a template wraps calls in, so a constrained decode (:meth:`Constraint.tool_call
<spec_rag.constrained.Constraint.tool_call>`) writes calls the parser reads back.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spec_rag.errors import InvalidInputError

__all__ = [
    "HERMES_TAGS",
    "ToolCall",
    "ToolsNotSupportedError",
    "check_tool_choice",
    "normalize_tools",
    "parse_tool_calls",
    "supports_tools",
    "tool_call_tags",
    "tool_name",
]

#: The tags Qwen2.5 and Hermes-style templates wrap each call in (opening, closing).
HERMES_TAGS = ("<tool_call>\n", "\n</tool_call>")
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_UNCLOSED = re.compile(r"<tool_call>\s*(\{.*\})\s*$", re.DOTALL)
_PROBE_NAME = "spec_rag_probe_tool"
_PROBE_CONTENT = "spec_rag_probe_result"


class ToolsNotSupportedError(InvalidInputError):
    """Tools were passed, but the model's chat template cannot render them."""


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the tool's ``name``, its ``arguments`` (parsed JSON) and an
    ``id`` (the model's own, or ``"call_"`` and 24 hex characters)."""

    name: str
    arguments: dict[str, Any]
    id: str

    def to_message_dict(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (OpenAI / Hugging Face form)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_name(tool: Mapping[str, Any]) -> str:
    """The name of an OpenAI-style ``{"type": "function", "function": {...}}`` or bare tool."""
    spec = tool.get("function", tool)
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidInputError(
            "a tool must be {'name': str, 'description': str, 'parameters': <JSON schema>} or "
            f"{{'type': 'function', 'function': {{...}}}}; got {dict(tool)!r}"
        )
    return name


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``tools`` in OpenAI's ``{"type": "function", "function": {...}}`` form, as chat templates
    expect them; bare ``{"name", "description", "parameters"}`` tools are wrapped."""
    if isinstance(tools, (Mapping, str)):
        raise InvalidInputError("tools must be a list of tool definitions, not one tool.")
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise InvalidInputError(f"a tool must be a dict (a JSON-schema tool definition), got {tool!r}")
        tool_name(tool)
        if "function" in tool:
            out.append({"type": "function", **dict(tool)})
        else:
            out.append({"type": "function", "function": dict(tool)})
    if not out:
        raise InvalidInputError("tools is empty; pass at least one tool, or leave tools unset.")
    return out


def check_tool_choice(
    tool_choice: str | Mapping[str, Any] | None, tools: Sequence[Mapping[str, Any]] | None
) -> str | None:
    """``tool_choice`` checked against ``tools``: ``None``/"auto", "none", "required" ("any" is
    its alias) or one tool's name (also as OpenAI's ``{"type": "function", "function": {"name":
    ...}}``). Returns "auto", "none", "required" or the name."""
    if tool_choice is None:
        return None
    if isinstance(tool_choice, Mapping):
        spec = tool_choice.get("function", tool_choice)
        tool_choice = spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(tool_choice, str):
        raise InvalidInputError(
            f"tool_choice must be 'auto', 'none', 'required' or a tool's name, got {tool_choice!r}"
        )
    if not tools:
        raise InvalidInputError(
            f"tool_choice={tool_choice!r} needs tools=[...]; pass the tools to choose from."
        )
    choice = "required" if tool_choice == "any" else tool_choice
    names = [tool_name(t) for t in tools]
    if choice not in ("auto", "none", "required") and choice not in names:
        raise InvalidInputError(
            f"tool_choice {tool_choice!r} names no tool; choose 'auto', 'none', 'required' or one of {names}"
        )
    return choice


# -- what a template can render -------------------------------------------------------------------
_SUPPORT: weakref.WeakKeyDictionary[Any, tuple[str, bool]] = weakref.WeakKeyDictionary()
_SUPPORT_LOCK = threading.Lock()


def supports_tools(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s chat template renders ``tools`` and tool messages (it is tried
    once per template with a probe tool, and the answer cached)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return False
    with _SUPPORT_LOCK:
        cached = _SUPPORT.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe_tool = {
        "type": "function",
        "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object"}},
    }
    messages = [
        {"role": "user", "content": "question"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}
            ],
        },
        {"role": "tool", "content": _PROBE_CONTENT, "tool_call_id": "call_0", "name": _PROBE_NAME},
    ]
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=[probe_tool], tokenize=False, add_generation_prompt=True
        )
        ok = isinstance(text, str) and text.count(_PROBE_NAME) >= 2 and _PROBE_CONTENT in text
    except Exception:  # a template that refuses tools or tool messages
        ok = False
    with _SUPPORT_LOCK:
        _SUPPORT[tokenizer] = (template, ok)
    return ok


def check_supports_tools(tokenizer: Any) -> None:
    """Raise :class:`ToolsNotSupportedError` unless ``tokenizer``'s template renders tools."""
    if not supports_tools(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ToolsNotSupportedError(
            f"the chat template of {name!r} cannot render tools or tool messages, so the model was not "
            "trained to call them. Use a target whose template has tools (e.g. the Qwen pair: "
            "qwen2.5-coder-1.5b-instruct with qwen2.5-coder-0.5b-instruct), or describe the task "
            "in the prompt and use response_format= for a JSON answer."
        )


def tool_call_tags(tokenizer: Any) -> tuple[str, str] | None:
    """The tags ``tokenizer``'s template wraps a call in, e.g. :data:`HERMES_TAGS`; ``None`` for a
    template that writes bare JSON calls (or renders no tools)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<tool_call>" in template:
        return HERMES_TAGS
    return None


def _call_from_json(payload: str) -> ToolCall | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = data.get("id")
    return ToolCall(
        data["name"], arguments, call_id if isinstance(call_id, str) and call_id else new_call_id()
    )


def parse_tool_calls(text: str, tokenizer: Any = None) -> tuple[str, list[ToolCall]]:
    """The content of ``text`` with its tool-call blocks removed, and the calls in order.

    Reads the format of ``tokenizer``'s template (Qwen2.5 / Hermes ``<tool_call>`` JSON blocks;
    a template without tags: the whole answer as one JSON call). A block whose JSON does not
    parse, or is not ``{"name": str, "arguments": {...}}``, stays in the content as written. A
    last block the model did not close (it stopped after the JSON) counts when its JSON parses.
    """
    if tokenizer is not None and tool_call_tags(tokenizer) is None and supports_tools(tokenizer):
        call = _call_from_json(text.strip())
        return ("", [call]) if call is not None else (text, [])
    calls: list[ToolCall] = []
    kept: list[str] = []
    cursor = 0
    for match in _BLOCK.finditer(text):
        call = _call_from_json(match.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[cursor : match.start()])
        cursor = match.end()
    rest = text[cursor:]
    unclosed = _UNCLOSED.search(rest)
    if unclosed is not None and "</tool_call>" not in rest[unclosed.start() :]:
        call = _call_from_json(unclosed.group(1))
        if call is not None:
            calls.append(call)
            rest = rest[: unclosed.start()]
    kept.append(rest)
    if not calls:
        return text, []
    return "\n".join(part.strip() for part in kept if part.strip()), calls

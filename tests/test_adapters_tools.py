"""The adapter core's tool helpers: tool_choice as frameworks give it, and call options."""

from __future__ import annotations

import pytest

from spec_rag import InvalidInputError
from spec_rag.adapters import resolve_tool_choice, split_tool_options

NAMES = ["search", "hours"]


@pytest.mark.parametrize(
    ("choice", "required", "expected"),
    [
        (None, False, None),
        (None, True, "required"),
        (False, True, "required"),
        (True, False, "required"),
        ("auto", False, "auto"),
        ("auto", True, "auto"),  # an explicit choice wins over tool_required
        ("none", False, "none"),
        ("any", False, "required"),
        ("required", False, "required"),
        ("Required", False, "required"),
        ("hours", False, "hours"),
        ({"type": "function", "function": {"name": "search"}}, False, "search"),
        ({"name": "hours"}, True, "hours"),
    ],
)
def test_tool_choice_resolves_to_the_engines(choice, required, expected) -> None:
    assert resolve_tool_choice("X", choice, NAMES, required=required) == expected


@pytest.mark.parametrize(
    ("choice", "match"),
    [
        ("lookup", r"'lookup', which is not one of the tools given \(search, hours\)"),
        ({"type": "function", "function": {"name": "lookup"}}, "'lookup'"),
        ({"type": "function"}, "pass 'auto', 'none', 'required'"),
        (3, "pass 'auto', 'none', 'required'"),
    ],
)
def test_a_bad_tool_choice_says_what_to_pass(choice, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        resolve_tool_choice("X", choice, NAMES)


def test_tool_options_are_split_from_sampling_options_and_unset_ones_dropped() -> None:
    call = {
        "temperature": 0.5,
        "tools": [{"name": "f"}],
        "tool_choice": None,
        "response_format": {"type": "object"},
    }
    assert split_tool_options(call) == (
        {"temperature": 0.5},
        {"tools": [{"name": "f"}], "response_format": {"type": "object"}},
    )

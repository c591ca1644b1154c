"""Constrained decoding (spec_rag.constrained): a tiny random model decoding under a JSON schema or a
tool-call grammar always ends with output that parses and validates; drafted tokens the grammar
forbids are refused; EOS waits for the JSON to close."""

from __future__ import annotations

import inspect
import json
import threading
from enum import StrEnum
from typing import Any, Literal

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from transformers import DynamicCache

from spec_rag.constrained import Constraint, ConstraintState, tool_call_schema
from spec_rag.testing import tiny_model, tiny_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
            "required": ["city"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
}
INSTANCE = {"name": "Ada", "age": 36, "role": "editor", "address": {"city": "London"}, "active": True}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> Any:
    return tiny_model(tokenizer, seed=3, layers=1)


def _forward(model: Any, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits of the last position, ``[vocab]``, after ``input_ids`` (``[1, q]``) on ``cache``."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{name: cache}).logits[0, -1]


def decode(
    model: Any,
    tokenizer: Any,
    state: ConstraintState,
    *,
    seed: int | None = None,
    max_new_tokens: int = 300,
    prompt: str = "Describe a person as JSON.",
) -> tuple[str, bool]:
    """Greedy (``seed`` None) or sampled decode under ``state``: the text and whether EOS came."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])  # [1, q]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = state.mask_logits(_forward(model, input_ids, cache))  # [vocab]
            if generator is None:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            state.advance(token)
            if token == tokenizer.eos_token_id:
                return tokenizer.decode(out), True
            out.append(token)
            input_ids = torch.tensor([[token]])
    return tokenizer.decode(out), False


def test_greedy_decode_under_a_schema_ends_with_json_that_validates(model, tokenizer):
    text, ended = decode(model, tokenizer, Constraint.json_schema(tokenizer, PERSON).new_state())
    assert ended
    jsonschema.validate(json.loads(text), PERSON)


def test_unconstrained_greedy_decode_is_not_json(model, tokenizer):
    """The tiny model on its own writes gibberish: the constraint is what makes the output valid."""
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])  # [1, q]
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=40, do_sample=False)
    with pytest.raises(ValueError):
        json.loads(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_decodes_under_a_schema_validate(model, tokenizer, seed):
    text, ended = decode(model, tokenizer, Constraint.json_schema(tokenizer, PERSON).new_state(), seed=seed)
    assert ended
    jsonschema.validate(json.loads(text), PERSON)


class Address(BaseModel):
    city: str = Field(max_length=8)
    floor: int = Field(ge=0, le=30)


class Ticket(BaseModel):
    title: str = Field(max_length=10)
    priority: Literal["low", "high"]
    tags: list[str] = Field(max_length=2)
    address: Address
    open: bool


def test_a_pydantic_model_class_constrains_to_its_schema(model, tokenizer):
    text, ended = decode(model, tokenizer, Constraint.json_schema(tokenizer, Ticket).new_state(), seed=4)
    assert ended
    Ticket.model_validate_json(text)
    assert json.loads(text).keys() == set(Ticket.model_fields)  # strict: no invented keys


def test_eos_is_forbidden_until_the_object_closes(tokenizer):
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False)
    for token in ids:
        assert not state.can_end
        assert not state.accepts(eos)
        assert state.mask_logits(torch.zeros(len(tokenizer)))[eos] == float("-inf")
        state.advance(token)
    assert state.can_end and state.accepts(eos)
    assert state.mask_logits(torch.zeros(len(tokenizer)))[eos] == 0.0
    state.advance(eos)
    assert state.is_finished


def test_a_complete_object_allows_only_eos(tokenizer):
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    instance = {"name": "Bo", "age": 1, "role": "admin", "scores": [1], "address": {"city": "X", "zip": 2}}
    for token in tokenizer.encode(json.dumps({**instance, "active": False}), add_special_tokens=False):
        state.advance(token)
    allowed = torch.nonzero(state.mask_logits(torch.zeros(len(tokenizer))) > float("-inf")).flatten()
    assert allowed.tolist() == [tokenizer.eos_token_id]


def test_accepts_agrees_with_the_mask_on_every_token(model, tokenizer):
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        masked = state.mask_logits(torch.randn(len(tokenizer), generator=generator))  # [vocab]
        allowed = masked > float("-inf")
        assert 0 < int(allowed.sum()) < len(tokenizer)
        assert [state.accepts(t) for t in range(len(tokenizer))] == allowed.tolist()
        state.advance(int(masked.argmax()))


def test_advance_refuses_a_forbidden_token_and_the_state_stays_usable(tokenizer):
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    forbidden = tokenizer.convert_tokens_to_ids("x")
    assert not state.accepts(forbidden)
    with pytest.raises(ValueError, match="not allowed"):
        state.advance(forbidden)
    opening = tokenizer.encode("{", add_special_tokens=False)[0]
    state.advance(opening)
    assert not state.can_end


def test_count_accepted_stops_at_the_first_forbidden_draft_token_and_rollback_undoes(tokenizer):
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    ids = tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False)
    forbidden = tokenizer.convert_tokens_to_ids("x")
    draft = [*ids[:5], forbidden, *ids[5:8]]
    assert state.count_accepted(draft) == 5
    assert state.count_accepted([len(tokenizer) + 3]) == 0  # a padded row of the logits
    for token in ids[:5]:
        state.advance(token)
    state.rollback(3)
    eos = tokenizer.eos_token_id
    assert state.count_accepted([*ids[2:], eos]) == len(ids) - 1  # EOS counts once the JSON is complete
    assert state.count_accepted([*ids[2:-1], eos]) == len(ids) - 3  # and not before


def test_logits_wider_than_the_tokenizer_forbid_the_padding_rows(tokenizer):
    model = tiny_model(tokenizer, seed=5, layers=1, vocab_size=len(tokenizer) + 64)  # padded embedding
    state = Constraint.json_schema(tokenizer, PERSON).new_state()
    masked = state.mask_logits(torch.zeros(len(tokenizer) + 64))
    assert torch.all(masked[len(tokenizer) :] == float("-inf"))
    text, ended = decode(model, tokenizer, Constraint.json_schema(tokenizer, PERSON).new_state(), seed=1)
    assert ended
    jsonschema.validate(json.loads(text), PERSON)


SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the documents.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 12},
                "top_k": {"type": "integer", "maximum": 9},
            },
            "required": ["query"],
        },
    },
}
WEATHER = {
    "name": "weather",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"]},
}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_tool_call_names_a_tool_and_its_arguments_validate(model, tokenizer, seed):
    tags = ("<tool_call>\n", "\n</tool_call>")
    constraint = Constraint.tool_call(tokenizer, [SEARCH, WEATHER], tags=tags)
    text, ended = decode(model, tokenizer, constraint.new_state(), seed=seed)
    assert ended
    assert text.startswith(tags[0]) and text.endswith(tags[1])
    call = json.loads(text[len(tags[0]) : -len(tags[1])])
    parameters = {"search": SEARCH["function"]["parameters"], "weather": WEATHER["parameters"]}
    assert set(call) == {"name", "arguments"}
    jsonschema.validate(call["arguments"], parameters[call["name"]])
    jsonschema.validate(call, tool_call_schema([SEARCH, WEATHER]))


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Size(BaseModel):
    width: int = Field(ge=0, le=9)


class Paint(BaseModel):
    colour: Colour
    size: Size


class Label(BaseModel):
    colour: Colour


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tools_whose_parameters_hold_definitions_compile_and_validate(model, tokenizer, seed):
    # A pydantic model with an enum or a nested model puts them under "$defs" and refers to them
    # from "#/$defs/..."; nested under "arguments" the references must still resolve, and two
    # tools' definitions of one name must not collide.
    tools = [
        {"name": "paint", "parameters": Paint.model_json_schema()},
        {
            "name": "label",
            "parameters": {**Label.model_json_schema(), "$defs": {"Colour": {"enum": ["green"]}}},
        },
    ]
    schema = tool_call_schema(tools)
    constraint = Constraint.tool_call(tokenizer, tools)
    text, ended = decode(model, tokenizer, constraint.new_state(), seed=seed)
    assert ended
    call = json.loads(text)
    jsonschema.validate(call, schema)
    if call["name"] == "paint":
        Paint.model_validate(call["arguments"])
    else:
        assert call["arguments"]["colour"] == "green"


def test_a_tag_that_is_a_special_token_is_matched_as_that_token(model, tokenizer):
    constraint = Constraint.tool_call(tokenizer, [WEATHER], tags=("<|im_start|>", "\n"))
    state = constraint.new_state()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert torch.nonzero(state.mask_logits(torch.zeros(len(tokenizer))) == 0).flatten().tolist() == [start]


def test_states_of_one_constraint_decode_independently_across_threads(model, tokenizer):
    constraint = Constraint.json_schema(tokenizer, PERSON)
    seeds = range(3)
    expected = [
        decode(model, tokenizer, constraint.new_state(), seed=seed, max_new_tokens=30)[0] for seed in seeds
    ]
    results: dict[int, str] = {}

    def run(seed: int) -> None:
        results[seed] = decode(model, tokenizer, constraint.new_state(), seed=seed, max_new_tokens=30)[0]

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[seed] for seed in seeds] == expected
    assert len(set(expected)) > 1  # the seeds do lead to different outputs


def test_constraints_are_compiled_once_per_tokenizer_and_schema(tokenizer):
    first = Constraint.json_schema(tokenizer, PERSON)
    assert Constraint.json_schema(tokenizer, dict(PERSON)) is first
    assert Constraint.json_schema(tokenizer, INSTANCE_SCHEMA) is not first
    assert Constraint.json_schema(tiny_tokenizer(600), PERSON) is not first
    assert Constraint.json_schema(tokenizer, PERSON).new_state() is not first.new_state()


INSTANCE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_bad_schemas_and_tools_fail_with_a_message_saying_what_to_do(tokenizer):
    with pytest.raises(ValueError, match=r"cannot be compiled.*weird"):
        Constraint.json_schema(tokenizer, {"type": "string", "format": "weird"})
    with pytest.raises(TypeError, match=r"JSON schema .* or a pydantic model"):
        Constraint.json_schema(tokenizer, "not a schema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one tool"):
        Constraint.tool_call(tokenizer, [])
    with pytest.raises(ValueError, match="a tool must be"):
        Constraint.tool_call(tokenizer, [{"description": "no name"}])


# Random schemas: objects (nested once) of bounded strings, integers, numbers, booleans, enums and
# arrays of them, with random required lists.
_WORDS = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
_SCALARS = st.one_of(
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.integers(-50, 50).map(lambda low: {"type": "integer", "minimum": low, "maximum": low + 99}),
    st.just({"type": "number", "minimum": 0, "maximum": 10}),
    st.just({"type": "boolean"}),
    st.lists(st.one_of(_WORDS, st.integers(-5, 5)), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}
    ),
)
_FIELDS = st.one_of(
    _SCALARS,
    st.tuples(_SCALARS, st.integers(0, 3)).map(lambda p: {"type": "array", "items": p[0], "maxItems": p[1]}),
)


@st.composite
def _objects(draw: Any, fields: Any) -> dict[str, Any]:
    properties = draw(st.dictionaries(_WORDS, fields, min_size=1, max_size=4))
    required = [name for name in properties if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required}


SCHEMAS = _objects(st.one_of(_FIELDS, _objects(_FIELDS)))


def decode_random_logits(tokenizer: Any, state: ConstraintState, seed: int, max_new_tokens: int = 400) -> str:
    """Sample under ``state`` from random logits: a harsher (and faster) adversary than a model."""
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = state.mask_logits(3 * torch.randn(len(tokenizer), generator=generator))  # [vocab]
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        state.advance(token)
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(out)
        out.append(token)
    raise AssertionError(f"no EOS within {max_new_tokens} tokens: {tokenizer.decode(out)!r}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_every_constrained_output_for_a_random_schema_parses_and_validates(tokenizer, schema, seed):
    text = decode_random_logits(tokenizer, Constraint.json_schema(tokenizer, schema).new_state(), seed)
    jsonschema.validate(json.loads(text), schema)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_the_tiny_models_output_for_a_random_schema_parses_and_validates(model, tokenizer, schema, seed):
    text, ended = decode(model, tokenizer, Constraint.json_schema(tokenizer, schema).new_state(), seed=seed)
    assert ended, f"no EOS within the token limit: {text!r}"
    jsonschema.validate(json.loads(text), schema)

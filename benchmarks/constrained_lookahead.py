"""SpecKV's verified lookahead on JSON-schema answers, with the draft's lookahead written under the
answer's grammar and without it: how many lookahead tokens the target accepted.

    python benchmarks/constrained_lookahead.py --target smollm2-135m-instruct \\
        --draft smollm2-135m-instruct --dtype float32

"with" is ``engine.generate(prompt, response_format=schema)``: a draft that shares the target's
vocabulary writes its lookahead under the schema and the target verifies it against its own
constrained greedy choice. "without" scores the prompt with no grammar (``engine.score``) and
answers under the schema from that scoring (``generate_from``): the draft's lookahead is free and
only the verified prefix the schema allows is accepted, which is what ``generate`` did before the
draft wrote under the grammar. Both answers are greedy; ``valid`` says whether each parses and
validates, ``same`` whether the two are equal token for token, and "opening = full inference's"
whether the accepted tokens and the next one are full inference's constrained answer. The
lookahead written under the grammar ends where the grammar does, so it may be shorter than
``--lookahead-tokens``.

``--draft-layers k`` makes the draft the target's first ``k`` layers (with its final norm and
output layer): a second model with the target's vocabulary when no other is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import jsonschema

from spec_rag import SpecEngine, SpecKVConfig
from spec_rag.models import get_model
from spec_rag.testing import corpus_text

SAMPLES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "Note: Ada Lovelace, born 1815 in London, wrote the first published program.",
        "Who is the person in the note? Answer as JSON with her name, birth year and city.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 30},
                "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
                "city": {"type": "string", "maxLength": 20},
            },
            "required": ["name", "born", "city"],
        },
    ),
    (
        "",
        "Is this text about Python's assert statement? Answer as JSON: whether it is relevant and "
        "a score from 0 to 5.",
        {
            "type": "object",
            "properties": {
                "relevant": {"type": "boolean"},
                "score": {"type": "integer", "minimum": 0, "maximum": 5},
            },
            "required": ["relevant", "score"],
        },
    ),
    (
        "",
        "List up to three keywords of the text above as JSON.",
        {
            "type": "object",
            "properties": {
                "keywords": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}
            },
            "required": ["keywords"],
        },
    ),
    (
        "Note: the Aurora vault code is kept in the archive.",
        "Decide the next step to find the Aurora vault code. Answer as JSON with an action and a query.",
        {
            "type": "object",
            "properties": {
                "action": {"enum": ["search", "answer", "ask"]},
                "query": {"type": "string", "maxLength": 40},
            },
            "required": ["action", "query"],
        },
    ),
]


def truncated(model: Any, layers: int) -> Any:
    """A copy of ``model`` that keeps only its first ``layers`` decoder layers."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft


def valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default="smollm2-135m-instruct")
    parser.add_argument("--draft-layers", type=int, help="the draft is the target's first k layers")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=int, default=128, help="SpecKV's cache budget")
    parser.add_argument("--window-size", type=int, default=16)
    parser.add_argument("--lookahead-tokens", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--context-chars", type=int, default=1500)
    args = parser.parse_args()

    target, tokenizer = get_model(args.target, dtype=args.dtype)
    if args.draft_layers:
        draft, draft_tokenizer = truncated(target, args.draft_layers), tokenizer
    else:
        draft, draft_tokenizer = get_model(args.draft, dtype=args.dtype)
    config = SpecKVConfig(
        max_capacity_prompt=args.budget, window_size=args.window_size, lookahead_tokens=args.lookahead_tokens
    )
    engine = SpecEngine(target, tokenizer, draft, draft_tokenizer, config)
    full_engine = SpecEngine(target, tokenizer)
    print(f"shared vocabulary: {engine.shared_vocabulary}", flush=True)
    context = corpus_text(args.context_chars)
    totals = {"with": 0, "with_n": 0, "without": 0, "without_n": 0}
    for number, (note, question, schema) in enumerate(SAMPLES):
        content = "\n\n".join(part for part in (context, note, question) if part)
        prompt = [{"role": "user", "content": content}]
        t0 = time.perf_counter()
        guided = engine.generate(prompt, response_format=schema, max_new_tokens=args.max_new_tokens)
        t1 = time.perf_counter()
        scored = engine.score(prompt, max_new_tokens=args.max_new_tokens)
        free = engine.generate_from(scored, response_format=schema, max_new_tokens=args.max_new_tokens)
        t2 = time.perf_counter()
        full = full_engine.generate(prompt, response_format=schema, max_new_tokens=args.max_new_tokens)
        k = guided.stats.lookahead_accepted
        exact = guided.token_ids[: k + 1] == full.token_ids[: k + 1]  # the verified opening
        totals["with"] += k
        totals["with_n"] += guided.stats.lookahead_tokens
        totals["without"] += free.stats.lookahead_accepted
        totals["without_n"] += free.stats.lookahead_tokens
        ok_with, ok_without = valid(guided.text, schema), valid(free.text, schema)
        print(
            f"sample {number}  prompt {guided.stats.prompt_tokens}  "
            f"with {k}/{guided.stats.lookahead_tokens} ({t1 - t0:.1f} s, valid {ok_with}, "
            f"opening = full inference's {exact})  "
            f"without {free.stats.lookahead_accepted}/{free.stats.lookahead_tokens} "
            f"({t2 - t1:.1f} s, valid {ok_without})  same {guided.token_ids == free.token_ids}\n"
            f"  with:    {guided.text!r}\n  without: {free.text!r}\n  full:    {full.text!r}",
            flush=True,
        )
    print(
        f"\naccepted with the grammar {totals['with']} of {totals['with_n']} lookahead tokens, "
        f"without {totals['without']} of {totals['without_n']}"
    )


if __name__ == "__main__":
    main()

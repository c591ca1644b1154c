"""BM25 from bm25s (spec_rag.retrieval.BM25) against the hand-written one it replaced: same scores,
and the time to index and query.

    python benchmarks/bm25_speed.py --queries 200

Corpora: the Python language reference as the demo retrieves it (passages of ~1800 characters)
and the same text split into sentences, as the benchmark's bm25-sentences baseline ranks it.
Queries are random draws of 1-12 words from the corpus vocabulary (seeded), plus a few written
questions. Prints the largest score difference, whether every top-10 ranking agrees, and the
seconds spent indexing and answering all queries, for each implementation.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence

from spec_rag.retrieval import BM25, python_reference_sections, tokenize_words


class HandWrittenBM25:
    """The pure-Python BM25 spec_rag used before bm25s (Lucene idf, Okapi term weight)."""

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize_words(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_length = sum(self.lengths) / max(len(self.docs), 1)
        frequency: Counter[str] = Counter()
        for d in self.docs:
            frequency.update(d.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}

    def scores(self, query: str) -> list[float]:
        words = tokenize_words(query)
        out = []
        for doc, length in zip(self.docs, self.lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / max(self.avg_length, 1e-9))
            out.append(
                sum(
                    self.idf.get(w, 0.0) * doc[w] * (self.k1 + 1) / (doc[w] + norm) for w in words if w in doc
                )
            )
        return out


def _top(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def compare(name: str, texts: list[str], queries: list[str]) -> None:
    rows = []
    results = {}
    for label, cls in (("hand-written", HandWrittenBM25), ("bm25s", BM25)):
        start = time.perf_counter()
        index = cls(texts)
        indexed = time.perf_counter() - start
        start = time.perf_counter()
        results[label] = [index.scores(q) for q in queries]
        answered = time.perf_counter() - start
        rows.append(f"| {name} | {label} | {len(texts)} | {indexed:.3f} | {answered:.3f} |")
    old, new = results["hand-written"], results["bm25s"]
    worst = max(
        abs(a - b) for olds, news in zip(old, new, strict=True) for a, b in zip(olds, news, strict=True)
    )
    same = all(_top(a, 10) == _top(b, 10) for a, b in zip(old, new, strict=True))
    print("\n".join(rows))
    print(f"|   | largest score difference {worst:.2e}; every top-10 ranking equal: {same} | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sections = python_reference_sections()
    passages = [f"{s.title}\n{s.text}" for s in sections]
    sentences = [s for text in passages for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    rng = random.Random(args.seed)
    vocabulary = sorted({w for text in passages for w in tokenize_words(text)})
    queries = [
        "What does the nonlocal statement do, and where can it be used?",
        "with statement context manager __enter__",
        "the the the",
        *(" ".join(rng.choices(vocabulary, k=rng.randint(1, 12))) for _ in range(args.queries)),
    ]
    print(f"{len(queries)} queries\n")
    print("| corpus | implementation | texts | index s | all queries s |")
    print("|---|---|---:|---:|---:|")
    compare("passages", passages, queries)
    compare("sentences", sentences, queries)


if __name__ == "__main__":
    main()

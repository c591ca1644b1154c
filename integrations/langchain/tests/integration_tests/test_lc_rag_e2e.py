"""End to end: BM25 retrieval -> SpecPC compression -> prompt -> ChatSpecKV (SpecKV) -> string,
on SmolLM2-135M as draft and target, over a corpus with one planted fact."""

from __future__ import annotations

import re

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableParallel, RunnablePassthrough
from langchain_spec_rag import ChatSpecKV, SpecPCCompressor
from rank_bm25 import BM25Okapi

pytestmark = pytest.mark.real_model

SMOLLM2 = "smollm2-135m-instruct"
CORPUS = [
    "The Aurora vault sits beneath the old observatory on Kestrel Hill. It was built in 1932 to store the "
    "observatory's glass plate photographs, and it is kept at a steady twelve degrees.",
    "The access code for the Aurora vault is 7319. Only the head archivist and the night warden are allowed "
    "to use it, and the code is changed every spring.",
    "Kestrel Hill observatory closed to the public in 1988 after its main telescope mirror cracked during a "
    "winter storm. The dome has since been restored by volunteers.",
    "The night warden walks the observatory grounds every two hours, checks the vault door and writes each "
    "round into a leather logbook kept by the entrance.",
    "Glass plate photographs are fragile: they are stored upright in acid-free sleeves, away from light, and "
    "handled only with cotton gloves.",
    "The head archivist, Mira Solberg, has catalogued more than forty thousand plates, including the 1954 "
    "comet series that made the observatory famous.",
    "Visitors to Kestrel Hill can take the funicular railway from the harbour; the ride takes eleven minutes "
    "and runs every half hour in summer.",
    "The observatory cafe serves cardamom buns and strong coffee, and on clear nights volunteers set up "
    "small telescopes on the terrace.",
]
QUESTION = "What is the access code for the Aurora vault?"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class _BM25Retriever(BaseRetriever):
    """The ``k`` documents with the best BM25 score for the query."""

    documents: list[Document]
    k: int = 4

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        scores = BM25Okapi([_words(d.page_content) for d in self.documents]).get_scores(_words(query))
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[: self.k]
        return [self.documents[i] for i in best]


def _format(documents: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in documents)


def test_compressed_rag_chain_answers_the_planted_fact() -> None:
    documents = [
        Document(page_content=t, id=f"note-{i}", metadata={"source": f"note-{i}"})
        for i, t in enumerate(CORPUS)
    ]
    retriever = ContextualCompressionRetriever(
        base_compressor=SpecPCCompressor(
            draft=SMOLLM2, max_capacity_prompt=80, window_size=16, kernel_size=9, neighbor_tokens=8
        ),
        base_retriever=_BM25Retriever(documents=documents),
    )
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer the question using only the context. Reply with the answer only."),
            ("human", "Context:\n{context}\n\nQuestion: {question}"),
        ]
    )
    llm = ChatSpecKV(
        model=SMOLLM2, draft=SMOLLM2, method="speckv", max_capacity_prompt=64, window_size=16, max_tokens=24
    )
    # The usual "RAG with sources" chain: the compressed documents come back beside the answer.
    answer = RunnablePassthrough.assign(context=lambda x: _format(x["docs"])) | prompt | llm
    chain = RunnableParallel(docs=retriever, question=RunnablePassthrough()).assign(answer=answer)

    result = chain.invoke(QUESTION)

    kept = result["docs"]
    assert kept, "the compressor kept nothing"
    stats = [d.metadata["spec_rag"] for d in kept]
    assert sum(s["kept_tokens"] for s in stats) < sum(s["original_tokens"] for s in stats)
    assert any("7319" in d.page_content for d in kept), "SpecPC dropped the planted fact"
    usage = result["answer"].response_metadata["spec_rag"]
    assert usage["kv_cache_tokens"] == 64 < usage["prompt_tokens"], "SpecKV must have cut the cache"
    assert "7319" in StrOutputParser().invoke(result["answer"])

"""LongLLMLingua, the prompt compressor a RAG user would pick instead of SpecPC, on the same samples.

    pip install --no-deps llmlingua==0.2.2     # its other needs (nltk, tiktoken) are in the dev extra
    python benchmarks/peer_longllmlingua.py --tasks niah_single_2 vt rag_qa --length 4096 --budget 2048

LongLLMLingua (question-aware coarse ranking of the contexts, then token-level compression by
the small model's conditional perplexity) runs with the draft as its small model, at the
budget SpecPC is given, with the settings its README recommends for RAG
(``rank_method="longllmlingua"``, ``condition_in_question="after_condition"``,
``reorder_context="sort"``, ``dynamic_context_compression_ratio=0.3``,
``condition_compare=True``, ``context_budget="+100"``). The target then answers the compressed
prompt (instruction, kept contexts, question, in one user message) greedily, and the answer is
scored as the accuracy harness scores it. A niah/vt/fwe/cwe haystack is one document of
sentences; it is given to LongLLMLingua as contexts of ``--units`` sentences each; rag_qa's
documents are its contexts.

Each line also shows what ``--results`` (a harness ``samples.jsonl`` for the same task, length,
seed and index) recorded for full context and SpecPC at the same budget, so both compressors
are judged on the same prompts.

LLMLingua 0.2.2 predates transformers 5: it passes the KV cache as a list of ``[key, value]``
pairs and counts tokens with tiktoken's GPT-3.5 encoding, which it downloads. Here the cache is
converted to and from transformers' ``DynamicCache`` around each forward, and the token counts
use the draft's tokenizer (so ``--budget`` is in the Qwen pair's tokens); nothing else changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from spec_rag import SpecEngine, TrustedPrompt
from spec_rag._prompt import format_prompt
from spec_rag.bench import TASKS, generate_sample, render_prompt
from spec_rag.bench.tasks import score_answer
from spec_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, get_model
from spec_rag.models.loading import resolve_model_source
from spec_rag.models.packs import fetch_pack


class _Encoding:
    """tiktoken's ``Encoding`` interface over a transformers tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_: Any) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def longllmlingua(draft_dir: str, dtype: torch.dtype) -> Any:
    import tiktoken
    from llmlingua import PromptCompressor
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    tiktoken.encoding_for_model = lambda name: _Encoding(tokenizer)  # no download

    class Compressor(PromptCompressor):
        def get_ppl(  # LLMLingua's own, with the cache converted for transformers 5
            self,
            text: str,
            granularity: str = "sentence",
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            past_key_values: list[list[torch.Tensor]] | None = None,
            return_kv: bool = False,
            end: int | None = None,
            condition_mode: str = "none",
            condition_pos_id: int = 0,
        ) -> Any:
            if input_ids is None:
                tokenized = self.tokenizer(text, return_tensors="pt")
                input_ids = tokenized["input_ids"].to(self.device)
                attention_mask = tokenized["attention_mask"].to(self.device)
            assert attention_mask is not None
            cache = DynamicCache(config=self.model.config)
            past_length = 0
            if past_key_values is not None:
                past_length = past_key_values[0][0].shape[2]
                for layer, (key, value) in enumerate(past_key_values):
                    cache.update(key, value, layer)
            end = input_ids.shape[1] if end is None else end
            end = min(end, past_length + self.max_position_embeddings)
            with torch.no_grad():
                response = self.model(
                    input_ids[:, past_length:end],
                    attention_mask=attention_mask[:, :end],
                    past_key_values=cache,
                    use_cache=True,
                )
            legacy = [[layer.keys, layer.values] for layer in cache.layers]
            logits = response.logits[..., :-1, :].contiguous()
            labels = input_ids[..., past_length + 1 : end].contiguous()
            active = (attention_mask[:, past_length:end] == 1)[..., :-1].view(-1)
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1))[active].float(), labels.view(-1)[active], reduction="none"
            )
            if condition_mode == "before":
                loss = loss[:condition_pos_id]
            elif condition_mode == "after":
                loss = loss[condition_pos_id:]
            result = loss.mean() if granularity == "sentence" else loss
            return (result, legacy) if return_kv else result

    return Compressor(
        model_name=draft_dir,
        device_map="cpu",
        model_config={"trust_remote_code": False, "torch_dtype": dtype},
    )


def contexts_of(sample: Any, units: int) -> list[str]:
    if sample.rag or len(sample.documents) > 1:
        return [f"{d.title}\n{d.text}" if d.title else d.text for d in sample.documents]
    (document,) = sample.documents
    parts = document.units
    return [document.joiner.join(parts[i : i + units]) for i in range(0, len(parts), units)]


def model_dir(name: str) -> str:
    source = resolve_model_source(name)
    return str(fetch_pack(source.location, progress=False) if source.kind == "pack" else source.location)


def recorded(path: Path | None, sample_id: str, sha: str, budget: int) -> dict[str, float]:
    """The harness's scores for this sample: full context, SpecPC and BM25 over the documents at
    ``budget`` prompt tokens, SpecKV-PC at ``budget`` prompt tokens and half that in cache; only
    rows of the very prompt ``sha`` (the SHA-256 of the rendered prompt) count."""
    wanted = {("full", None), ("specpc", budget), ("speckv-pc", budget // 2), ("bm25-docs", budget)}
    scores: dict[str, float] = {}
    if path is None or not path.exists():
        return scores
    for line in path.read_text().splitlines():
        row = json.loads(line)
        same = row["sample_id"] == sample_id and row["prompt_sha256"] == sha
        if same and (row["method"], row["budget"]) in wanted:
            scores[row["method"]] = row["score"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["niah_single_2"], choices=list(TASKS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=int, default=2048, help="prompt tokens LongLLMLingua may keep")
    parser.add_argument("--units", type=int, default=8, help="haystack sentences per context")
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--results", type=Path, default=None, help="a harness samples.jsonl to compare with")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per sample here")
    args = parser.parse_args()

    engine = SpecEngine(*get_model(args.target, dtype=args.dtype))
    compressor = longllmlingua(model_dir(args.draft), engine.target.dtype)
    tokenizer = engine.tokenizer
    totals: dict[str, list[float]] = {}
    for task in args.tasks:
        for index in args.indices:
            sample = generate_sample(task, args.length, args.seed, index, tokenizer)
            start = time.perf_counter()
            result = compressor.compress_prompt(
                contexts_of(sample, args.units),
                instruction=sample.instruction,
                question=sample.question,
                target_token=args.budget,
                rank_method="longllmlingua",
                condition_in_question="after_condition",
                reorder_context="sort",
                dynamic_context_compression_ratio=0.3,
                condition_compare=True,
                context_budget="+100",
            )
            seconds = time.perf_counter() - start
            messages = [{"role": "user", "content": result["compressed_prompt"]}]
            prompt = TrustedPrompt(format_prompt(tokenizer, messages) + sample.answer_prefix)
            out = engine.generate(prompt, max_new_tokens=sample.max_new_tokens)
            score = score_answer(out.text, sample.answers, sample.metric)
            sha = hashlib.sha256(render_prompt(sample, tokenizer).encode("utf-8")).hexdigest()
            theirs = recorded(args.results, sample.id, sha, args.budget)
            for name, value in (("longllmlingua", score), *theirs.items()):
                totals.setdefault(name, []).append(value)
            print(
                f"{sample.id}: longllmlingua {score:.2f} ({out.stats.prompt_tokens} prompt tokens, "
                f"compression {seconds:.1f} s)  "
                + "  ".join(f"{k} {v:.2f}" for k, v in theirs.items())
                + f"  answer {out.text.strip()[:60]!r}",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as f:
                    row = dict(
                        id=sample.id,
                        score=score,
                        prompt_tokens=out.stats.prompt_tokens,
                        compression_s=seconds,
                        answer=out.text,
                        recorded=theirs,
                    )
                    f.write(json.dumps(row) + "\n")
    print("\nmeans over samples:")
    for name, values in totals.items():
        print(f"  {name}: {100 * sum(values) / len(values):.1f} (n={len(values)})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

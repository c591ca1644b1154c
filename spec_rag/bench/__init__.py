"""Offline evaluation harness: RULER-style synthetic tasks and a RAG task, every method of
spec-rag and a few prompt-compression baselines at several budgets, accuracy and speed.

``python -m spec_rag.bench accuracy|speed|report --help`` runs it; the modules are:
``tasks`` (seeded samples sized with the target's tokenizer), ``methods`` (how each method
answers a sample at a budget), ``runner`` (resumable runs writing ``samples.jsonl``) and
``report`` (markdown tables and plots).
"""

from spec_rag.bench.methods import METHOD_NAMES, EncodedPrompt, Harness, Outcome, encode_tokens, kept_text
from spec_rag.bench.runner import run_accuracy, run_speed
from spec_rag.bench.tasks import TASKS, Sample, generate_sample, generate_samples, render_prompt, score_answer

__all__ = [
    "METHOD_NAMES",
    "TASKS",
    "EncodedPrompt",
    "Harness",
    "Outcome",
    "Sample",
    "encode_tokens",
    "generate_sample",
    "generate_samples",
    "kept_text",
    "render_prompt",
    "run_accuracy",
    "run_speed",
    "score_answer",
]

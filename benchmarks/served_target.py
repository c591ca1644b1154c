"""Prompt tokens and latency of a served model, SpecPC-compressed context vs full context.

    python benchmarks/served_target.py                      # starts `transformers serve` on SmolLM2-135M
    python benchmarks/served_target.py --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

The target answers through its OpenAI-compatible endpoint (vLLM, SGLang, TGI, llama.cpp or
`transformers serve`); only the draft runs here, in-process, to compress the documents. Every
question hides one fact in one of a few sections of the Python language reference. For each
question the script sends the full documents once and the SpecPC-kept documents once and prints
the prompt tokens the server reports (``usage.prompt_tokens``), the request's wall time, the
draft's compression time and whether the answer holds the fact.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Answer the question using the documents. Be brief."
# (seed of the sections around the fact, fact hidden in them, question, what the answer must contain)
FACTS: tuple[tuple[int, str, str, str], ...] = (
    (
        2,
        "The ferry to Ostrava leaves at 7:45 every morning.",
        "When does the ferry to Ostrava leave?",
        "7:45",
    ),
    (
        0,
        "The vault in the north tower opens with the code 4721.",
        "What is the code of the vault in the north tower?",
        "4721",
    ),
    (
        1,
        "The lighthouse keeper's cat is named Pepper.",
        "What is the name of the lighthouse keeper's cat?",
        "Pepper",
    ),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def transformers_serve(model_dir: str | os.PathLike[str], *, startup_s: float = 180.0) -> Iterator[str]:
    """Run ``transformers serve`` on ``model_dir`` (CPU, 127.0.0.1 only) and yield its ``/v1`` base URL.

    The server process is always stopped on exit (terminate, then kill). Raises ``RuntimeError``
    with the end of the server's log if it exits or does not answer ``/health`` in ``startup_s``.
    """
    port = free_port()
    executable = Path(sys.executable).with_name("transformers")
    argv = [str(executable), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    state = (
                        f"exited with code {server.returncode}"
                        if server.poll() is not None
                        else (f"did not answer /health within {startup_s:.0f} s")
                    )
                    raise RuntimeError(f"`{' '.join(argv)}` {state}. Its log ends with:\n{tail}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=15)


def questions(n: int, documents: int = 3) -> list[tuple[list[str], str, str]]:
    """``n`` (documents, question, expected) triples: sections of the Python reference, one of which
    holds the fact in its middle."""
    from spec_rag.retrieval import python_reference_sections

    sections = python_reference_sections()
    out = []
    for seed, fact, question, expected in FACTS[:n]:
        texts = [s.text for s in random.Random(seed).sample(sections, documents)]
        middle = len(texts[1]) // 2
        texts[1] = f"{texts[1][:middle]} {fact} {texts[1][middle:]}"
        out.append((texts, question, expected))
    return out


def prompt(documents: Sequence[str], question: str) -> str:
    body = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(documents, 1))
    return f"{INSTRUCTION}\n\nDocuments:\n\n{body}\n\nQuestion: {question}"


@dataclass
class Row:
    question: int
    context: str
    prompt_tokens: int
    request_s: float
    compress_s: float
    correct: bool
    answer: str


def measure(base_url: str, model: str, draft: str, budget: int, n: int, max_tokens: int = 24) -> list[Row]:
    from openai import OpenAI

    from spec_rag import SpecPC, SpecPCConfig, get_model
    from spec_rag.openai_endpoint import answer_through_endpoint

    draft_model, draft_tokenizer = get_model(draft)
    specpc = SpecPC(draft_model, draft_tokenizer, SpecPCConfig(max_capacity_prompt=budget))
    client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=300)
    # One request first, so the first timed one does not pay for the server's warm-up.
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    rows = []
    for i, (documents, question, expected) in enumerate(questions(n)):
        start = time.perf_counter()
        parts = specpc.compress_documents(question, documents)
        compress_s = time.perf_counter() - start
        kept = [part.text for part in parts if part.kept_tokens > 0]
        for context, texts, spent in (("full", documents, 0.0), ("specpc", kept, compress_s)):
            reply = answer_through_endpoint(
                prompt(texts, question), base_url=base_url, model=model, max_tokens=max_tokens, client=client
            )
            rows.append(
                Row(i, context, reply.prompt_tokens, reply.seconds, spent, expected in reply.text, reply.text)
            )
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'question':>8} {'context':<7} {'prompt tokens':>13} {'request s':>9} {'draft s':>7} {'correct':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.question:>8} {r.context:<7} {r.prompt_tokens:>13} {r.request_s:>9.2f} "
            f"{r.compress_s:>7.2f} {r.correct!s:>7}"
        )
    for context in ("full", "specpc"):
        mine = [r for r in rows if r.context == context]
        tokens = sum(r.prompt_tokens for r in mine) / len(mine)
        request = sum(r.request_s for r in mine) / len(mine)
        draft = sum(r.compress_s for r in mine) / len(mine)
        right = sum(r.correct for r in mine)
        lines.append(
            f"{'mean':>8} {context:<7} {tokens:>13.0f} {request:>9.2f} {draft:>7.2f} "
            f"{f'{right}/{len(mine)}':>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url", help="an OpenAI-compatible endpoint; default: start `transformers serve`"
    )
    parser.add_argument(
        "--model", help="the served model's name (default: the SmolLM2-135M pack's directory)"
    )
    parser.add_argument("--draft", default="smollm2-135m-instruct", help="draft model for SpecPC")
    parser.add_argument("--budget", type=int, default=512, help="SpecPC's max_capacity_prompt")
    parser.add_argument("--questions", type=int, default=len(FACTS), choices=range(1, len(FACTS) + 1))
    args = parser.parse_args(argv)
    if args.base_url is not None:
        if args.model is None:
            parser.error("--base-url needs --model (the name the server serves)")
        rows = measure(args.base_url, args.model, args.draft, args.budget, args.questions)
    else:
        from spec_rag.models import fetch_pack

        model = args.model or str(fetch_pack("smollm2-135m-instruct", progress=False))
        with transformers_serve(model) as base_url:
            rows = measure(base_url, model, args.draft, args.budget, args.questions)
    print(table(rows))


if __name__ == "__main__":
    main()

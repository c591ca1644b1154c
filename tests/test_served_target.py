"""SpecPC in front of a real OpenAI-compatible server: `transformers serve` on the CPU with the
SmolLM2-135M pack, reached through the standard clients (openai, ChatOpenAI, OpenAILike).

The server is a separate process on a free 127.0.0.1 port, started once for this module and always
stopped. These tests may open sockets to 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from spec_rag import InvalidInputError, SpecPC, SpecPCConfig, get_model
from spec_rag.models import fetch_pack
from spec_rag.openai_endpoint import answer_through_endpoint
from spec_rag.testing import run_notebook

pytestmark = [pytest.mark.real_model, pytest.mark.allow_hosts(["127.0.0.1"])]

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("served_target", ROOT / "benchmarks" / "served_target.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["served_target"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


served = _benchmark()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """``(base_url, model)`` of a running ``transformers serve``; stopped after the module."""
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing or not Path(sys.executable).with_name("transformers").exists():
        pytest.skip(
            "`transformers serve` cannot run here (missing: "
            f"{', '.join(missing) or 'the transformers CLI'}): pip install 'transformers[serving]' openai"
        )
    model_dir = str(fetch_pack(SMOLLM2, progress=False))
    with served.transformers_serve(model_dir) as base_url:
        yield base_url, model_dir


@pytest.fixture(scope="module")
def specpc() -> SpecPC:
    model, tokenizer = get_model(SMOLLM2)
    return SpecPC(model, tokenizer, SpecPCConfig(max_capacity_prompt=256))


def test_server_reads_exactly_the_compressed_prompt(server, specpc) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    base_url, model = server
    served_tokenizer = AutoTokenizer.from_pretrained(model)
    client = OpenAI(base_url=base_url, api_key="EMPTY", timeout=300, max_retries=0)
    [(documents, question, expected)] = served.questions(1)
    parts = specpc.compress_documents(question, documents)
    kept = [part.text for part in parts if part.kept_tokens > 0]

    counted = {}
    for context, texts in (("full", documents), ("specpc", kept)):
        messages = [{"role": "user", "content": served.prompt(texts, question)}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        template = served_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert reply.usage is not None
        # What the server says it read is what the served model's tokenizer makes of our prompt.
        assert reply.usage.prompt_tokens == len(template["input_ids"]), context
        counted[context] = reply.usage.prompt_tokens
        if context == "specpc":
            assert expected in (reply.choices[0].message.content or ""), reply.choices[0].message.content
    assert counted["specpc"] < counted["full"] / 2, counted
    assert expected in " ".join(kept), "SpecPC dropped the fact the question asks for"


def test_endpoint_helper_refuses_bad_input_before_any_request() -> None:
    class NoCalls:
        def __getattr__(self, name: str) -> None:
            raise AssertionError("no request may be sent")

    for prompt, model, max_tokens in (("  ", "m", 8), ("Hi", "", 8), ("Hi", "m", 0)):
        with pytest.raises(InvalidInputError):
            answer_through_endpoint(
                prompt, base_url="http://127.0.0.1:9/v1", model=model, max_tokens=max_tokens, client=NoCalls()
            )


def test_endpoint_helper_reports_what_the_server_read(server) -> None:
    from transformers import AutoTokenizer

    base_url, model = server
    reply = answer_through_endpoint(
        "What is the capital of France?", base_url=base_url, model=model, max_tokens=8
    )
    template = AutoTokenizer.from_pretrained(model).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert reply.prompt_tokens == len(template["input_ids"])
    assert 0 < reply.completion_tokens <= 8 and reply.seconds > 0 and reply.text


def test_benchmark_prints_what_the_server_reported(server, capsys) -> None:
    base_url, model = server
    served.main(["--base-url", base_url, "--model", model, "--questions", "1", "--budget", "256"])
    lines = capsys.readouterr().out.splitlines()
    full = next(line.split() for line in lines if line.split()[:2] == ["mean", "full"])
    specpc = next(line.split() for line in lines if line.split()[:2] == ["mean", "specpc"])
    assert int(specpc[2]) < int(full[2])
    assert float(specpc[4]) > 0 == float(full[4])  # only the compressed run pays for the draft


def test_bench_answers_through_the_endpoint_and_records_what_the_server_read(server, tmp_path) -> None:
    from spec_rag.bench.__main__ import main as bench
    from spec_rag.bench.records import SAMPLES_FILE, read_jsonl

    base_url, model = server
    argv = ["accuracy", "--endpoint-model", model, "--target", model, "--draft", SMOLLM2, "--quiet"]
    # rag_qa: several documents with headers, some of which SpecPC may drop whole.
    argv += ["--tasks", "rag_qa", "--lengths", "800", "--samples", "1", "--prompt-budgets", "400"]
    argv += ["--max-new-tokens", "4", "--out", str(tmp_path)]
    assert bench([*argv, "--endpoint", base_url]) == 0
    records = read_jsonl(tmp_path / SAMPLES_FILE)
    assert sorted((r["method"], r["budget"] or 0) for r in records) == [("full", 0), ("specpc", 400)]
    for r in records:
        stats = r["stats"]
        assert r["target"] == f"{model} (served)" and r["score"] in (0.0, 1.0, 0.5)
        assert 0 < stats["completion_tokens"] <= 4 and stats["request_s"] > 0
        assert stats["total_s"] == pytest.approx(stats["request_s"] + stats["draft_s"])
        if r["method"] == "full":
            # The local count of the sample's chat is what the server reports reading.
            assert stats["served_prompt_tokens"] == stats["prompt_tokens"] >= 600
            assert stats["draft_s"] == 0
        else:
            # The budget counts the prompt the server reads: at most 400, near it (headers of
            # documents dropped whole, and how kept runs re-join, may leave a little unused).
            assert 360 <= stats["served_prompt_tokens"] <= 400, stats
            assert stats["draft_s"] > 0 and not stats["same_as_full"]
            assert stats["served_prompt_tokens"] == stats["kept_tokens"]  # counted here as there
    assert f"{model} (served)" in (tmp_path / "results.md").read_text()
    # A rerun finds every answer recorded and asks the server nothing (this URL answers nothing).
    assert bench([*argv, "--endpoint", "http://127.0.0.1:9/v1"]) == 0
    assert len(read_jsonl(tmp_path / SAMPLES_FILE)) == 2


def test_bench_through_an_endpoint_refuses_methods_a_server_cannot_run(tmp_path, capsys) -> None:
    from spec_rag.bench.__main__ import main as bench

    base = ["accuracy", "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path), "--quiet"]
    assert bench([*base, "--endpoint-model", "m", "--methods", "full", "speckv"]) == 1
    assert "only full and specpc run" in capsys.readouterr().err
    assert bench(base) == 1
    assert "--endpoint needs --endpoint-model" in capsys.readouterr().err
    assert not (tmp_path / "samples.jsonl").exists()


# Embedding, the draft's passes and four served answers: minutes on a busy 2-core CPU.
@pytest.mark.timeout(1800)
def test_served_target_cookbook_runs_against_the_server(server, tmp_path) -> None:
    base_url, model = server
    env = {
        "SPEC_RAG_COOKBOOK_BASE_URL": base_url,
        "SPEC_RAG_COOKBOOK_SERVED_MODEL": model,
        "SPEC_RAG_COOKBOOK_DRAFT": SMOLLM2,
        "OPENAI_API_KEY": "EMPTY",
        "SPEC_RAG_COOKBOOK_MAX_TOKENS": "16",  # the answers are not checked here
    }
    printed = "\n".join(run_notebook(ROOT / "cookbooks" / "served_target.ipynb", tmp_path, env, timeout=900))
    # Lines "<framework> <context>: server read N prompt tokens"
    read = {}
    for line in printed.splitlines():
        if ": server read " in line:
            name, rest = line.split(": server read ")
            read[name.strip()] = int(rest.split()[0])
    assert set(read) == {"langchain full", "langchain specpc", "llamaindex full", "llamaindex specpc"}, (
        printed
    )
    assert read["langchain specpc"] < read["langchain full"]
    assert read["llamaindex specpc"] < read["llamaindex full"]

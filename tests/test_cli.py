"""The spec-rag command line, run in-process on the small offline pack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_models import _fake_pack

from spec_rag import cli
from spec_rag.models import PACKS
from spec_rag.testing import watch_layer_reads

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--target", "smollm2-135m-instruct", "--draft", "smollm2-135m-instruct", "--quiet"]


def test_models_list_names_every_pack(capsys):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in PACKS:
        assert name in out


def test_models_list_does_not_import_the_benchmark():
    script = (
        "import sys\n"
        "from spec_rag import cli\n"
        "assert cli.main(['models', 'list', '--quiet']) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('spec_rag.bench')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert "smollm2-135m-instruct" in run.stdout


def test_bench_is_listed_in_the_help_and_runs_under_spec_rag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "report", "--help"])
    assert "--include" in capsys.readouterr().out  # the real benchmark parser, mounted on demand


def _imports_between_submodules() -> dict[str, set[str]]:
    """Every spec_rag module -> the spec_rag submodules it imports, at module level or inside a
    function (imports of the top-level package's re-exports are left out)."""
    modules: dict[str, Path] = {}
    for path in (REPO_ROOT / "spec_rag").rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spec_rag"):
                for alias in node.names:
                    whole = f"{node.module}.{alias.name}"
                    found.add(whole if whole in modules else module_of(node.module))
            elif isinstance(node, ast.Import):
                found.update(module_of(a.name) for a in node.names if a.name.startswith("spec_rag"))
        graph[name] = found - {name, "spec_rag"}
    return graph


def test_no_import_cycles_between_spec_rag_modules():
    graph = _imports_between_submodules()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.real_model
def test_demo_answers_and_compares_with_full_context(capsys):
    code = cli.main(
        ["demo", *SMALL, "--top-k", "2", "--budget", "300", "--kv-budget", "128", "--max-new-tokens", "8"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Answer (smollm2-135m-instruct" in out and "Sources (tokens kept by SpecPC):" in out
    table = [
        line
        for line in out.splitlines()
        if line.startswith("| spec-rag") or line.startswith("| full context")
    ]
    ours, full = (line.split("|") for line in table)
    assert int(ours[2]) <= 300 < int(full[2])  # the target saw the compressed prompt
    assert int(ours[3]) == 128  # KV entries kept
    assert float(ours[4]) < float(full[4])  # KV MiB
    assert float(ours[5]) >= 0 and float(full[5]) >= 0  # peak MiB above the loaded models


@pytest.mark.real_model
def test_compress_json_reports_each_document(tmp_path, capsys):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("The access code for the Aurora vault is 7319. " + "Filler sentence here. " * 60)
    second.write_text("Gardening notes about tomatoes and basil. " * 40)
    argv = ["compress", str(first), str(second), "--query", "What is the Aurora access code?"]
    code = cli.main([*argv, "--budget", "160", "--draft", "smollm2-135m-instruct", "--json", "--quiet"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    assert payload["query"] == "What is the Aurora access code?"
    docs = payload["documents"]
    assert [d["source"] for d in docs] == [str(first), str(second)]
    for doc in docs:
        assert set(doc) == {"index", "source", "text", "score", "original_tokens", "kept_tokens", "ratio"}
        assert 0 <= doc["kept_tokens"] <= doc["original_tokens"]
    assert sum(d["kept_tokens"] for d in docs) < sum(d["original_tokens"] for d in docs)


def test_unknown_method_is_one_clear_line(capsys):
    code = cli.main(["generate", "hello", "--method", "lingua", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [err[0]] and "unknown method 'lingua'" in err[0] and "Traceback" not in err[0]


def test_missing_model_path_is_one_clear_line(tmp_path, capsys):
    code = cli.main(["generate", "hello", "--method", "full", "--target", str(tmp_path / "nope"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "no such file or directory" in err.lower()


def test_a_mistyped_model_name_names_the_pack_it_probably_meant(capsys):
    code = cli.main(["generate", "hello", "--method", "full", "--target", "smollm2-135m", "--quiet"])
    assert code == 1 and "Did you mean 'smollm2-135m-instruct'?" in capsys.readouterr().err
    assert cli.main(["models", "path", "smollm2-135m", "--quiet"]) == 1
    assert "Did you mean 'smollm2-135m-instruct'?" in capsys.readouterr().err


def test_corrupted_pack_is_refused_by_checksum(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEC_RAG_HOME", str(tmp_path / "home"))
    pack = _fake_pack(tmp_path / "site", [b"not really a model"], sha256="0" * 64, name="corrupt-pack")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKS, pack.name, pack)
    code = cli.main(["models", "path", "corrupt-pack", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "sha256" in err
    assert not any((tmp_path / "home").rglob("*.gguf"))  # no partial file left behind


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match=r"(?i)no such file or directory"):
        cli.main(["generate", "hi", "--method", "full", "--target", str(tmp_path / "nope"), "--debug"])


def test_a_negative_prefill_chunk_size_is_one_clear_line_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda *args: pytest.fail("no model is loaded for a bad option"))
    code = cli.main(["generate", "hello", "--method", "full", "--prefill-chunk-size", "-5", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--prefill-chunk-size must be a positive" in err[0]


@pytest.mark.real_model
def test_generate_reads_a_prompt_in_prefill_chunks_with_the_same_answer(monkeypatch, capsys):
    watched: list[list[int]] = []  # per load, the tokens each call of the first layer reads
    hooks = []
    load = cli._load

    def load_and_watch(args, name):
        model, tokenizer = load(args, name)
        reads, hook = watch_layer_reads(model)
        hooks.append(hook)
        watched.append(reads)
        return model, tokenizer

    monkeypatch.setattr(cli, "_load", load_and_watch)
    prompt = "The vault code is 7319. " * 12 + "What is the vault code?"
    argv = ["generate", prompt, "--method", "full", "--chat", "--max-new-tokens", "8", *SMALL]
    try:
        assert cli.main([*argv, "--prefill-chunk-size", "0"]) == 0
        whole = capsys.readouterr().out
        assert max(n for reads in watched for n in reads) > 32
        watched.clear()
        assert cli.main([*argv, "--prefill-chunk-size", "32"]) == 0
        assert watched and max(n for reads in watched for n in reads) <= 32
    finally:
        for hook in hooks:
            hook.remove()
    assert capsys.readouterr().out == whole and whole.strip()

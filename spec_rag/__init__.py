"""spec-rag: draft-based approximate inference (SpecPC, SpecKV, SpecKV-PC) for RAG."""

from typing import TYPE_CHECKING

from spec_rag._prompt import DEFAULT_MAX_INPUT_TOKENS, TrustedPrompt, trusted
from spec_rag.config import (
    DEFAULT_METHOD,
    METHODS,
    MethodInfo,
    SnapKVConfig,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    StreamingLLMConfig,
    config_for_method,
    method_info,
)
from spec_rag.constrained import Constraint
from spec_rag.engine import Generation, GenerationStats, GenerationStream, ScoredPrompt, SpecEngine
from spec_rag.errors import (
    ChecksumError,
    ContextLengthError,
    InputTooLargeError,
    InvalidInputError,
    ModelNotFoundError,
    PackNotInstalledError,
    SpecRagError,
    UnsupportedModelError,
)
from spec_rag.specpc import Compression, DocumentCompression, SpecPC
from spec_rag.tools import ToolCall, ToolsNotSupportedError, parse_tool_calls, supports_tools

if TYPE_CHECKING:
    from spec_rag.models import check_model_source, get_model, load_model

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Model loading pulls in the GGUF and hub machinery; import it only when asked for.
    if name in ("load_model", "get_model", "check_model_source"):
        from spec_rag import models

        return getattr(models, name)
    raise AttributeError(f"module 'spec_rag' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_INPUT_TOKENS",
    "DEFAULT_METHOD",
    "METHODS",
    "ChecksumError",
    "Compression",
    "Constraint",
    "ContextLengthError",
    "DocumentCompression",
    "Generation",
    "GenerationStats",
    "GenerationStream",
    "InputTooLargeError",
    "InvalidInputError",
    "MethodInfo",
    "ModelNotFoundError",
    "PackNotInstalledError",
    "ScoredPrompt",
    "SnapKVConfig",
    "SpecEngine",
    "SpecKVConfig",
    "SpecKVPCConfig",
    "SpecPC",
    "SpecPCConfig",
    "SpecRagError",
    "StreamingLLMConfig",
    "ToolCall",
    "ToolsNotSupportedError",
    "TrustedPrompt",
    "UnsupportedModelError",
    "__version__",
    "check_model_source",
    "config_for_method",
    "get_model",
    "load_model",
    "method_info",
    "parse_tool_calls",
    "supports_tools",
    "trusted",
]

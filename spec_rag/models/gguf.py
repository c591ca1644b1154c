"""Reading a GGUF file as a dense transformers model: used by pack conversion and by
:func:`spec_rag.models.load_model` for a ``.gguf`` path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = ["ModelAndTokenizer", "load_gguf"]

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def load_gguf(
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

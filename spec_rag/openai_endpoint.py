"""Answer a prompt through an OpenAI-compatible endpoint (vLLM, SGLang, TGI, llama.cpp's server,
``transformers serve``, or a hosted API), with the ``openai`` client.

SpecPC compresses the prompt in-process; this module sends the result to a served target and
reports what the server says it read. It needs ``pip install openai``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spec_rag.errors import InvalidInputError, SpecRagError

__all__ = ["EndpointAnswer", "answer_through_endpoint"]


@dataclass(frozen=True)
class EndpointAnswer:
    """One chat completion: the text, the server's token counts and the request's wall time."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def answer_through_endpoint(
    prompt: str | Sequence[Mapping[str, str]],
    *,
    base_url: str,
    model: str,
    api_key: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    client: Any = None,
) -> EndpointAnswer:
    """Send ``prompt`` as one user message to ``{base_url}/chat/completions`` and return the answer.

    Args:
        prompt: the whole user message (for SpecPC: the compressed documents and the question),
            or the chat messages (``{"role": ..., "content": ...}``) to send as they are.
        base_url: the server's OpenAI-compatible root, e.g. ``"http://localhost:8000/v1"``.
        model: the name the server serves the model under.
        api_key: defaults to ``$OPENAI_API_KEY``, else ``"EMPTY"`` (what local servers accept).
        client: an ``openai.OpenAI`` to reuse instead of building one (``base_url``, ``api_key``
            and ``timeout_s`` are then ignored).

    Raises:
        InvalidInputError: an empty prompt (or no messages) or model name, or ``max_tokens`` < 1.
        SpecRagError: ``openai`` is not installed, or the server reported no token usage.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    if not any(m["content"].strip() for m in messages):
        raise InvalidInputError("the prompt is empty: pass the text the served model should answer.")
    if not model.strip():
        raise InvalidInputError(f"model is empty: pass the name the server serves (GET {base_url}/models).")
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be at least 1, got {max_tokens}.")
    if client is None:
        try:
            from openai import OpenAI
        except ImportError:
            raise SpecRagError(
                "answering through an endpoint needs the openai client: pip install openai"
            ) from None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s)
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
    )
    seconds = time.perf_counter() - start
    if reply.usage is None:
        raise SpecRagError(f"the server at {base_url} reported no token usage for model {model!r}.")
    return EndpointAnswer(
        text=reply.choices[0].message.content or "",
        prompt_tokens=int(reply.usage.prompt_tokens),
        completion_tokens=int(reply.usage.completion_tokens),
        seconds=seconds,
    )

"""Errors spec-rag raises. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class SpecRagError(Exception):
    """Base class of every error spec-rag raises on purpose."""


class InvalidInputError(SpecRagError, ValueError):
    """The request itself cannot be served as given (empty prompt, bad budget, ...)."""


class ContextLengthError(InvalidInputError):
    """A prompt is longer than a model's context window."""


class UnsupportedModelError(SpecRagError):
    """The model's architecture cannot be scored or compressed (e.g. sliding-window layers)."""


class ModelNotFoundError(SpecRagError):
    """A model name or path resolved to nothing loadable."""


class PackNotInstalledError(SpecRagError):
    """An offline model pack's packages are not installed."""


class ChecksumError(SpecRagError):
    """An assembled model file does not match its pinned sha256."""


class InputTooLargeError(ContextLengthError):
    """A request is larger than the configured ``max_input_tokens`` ceiling."""

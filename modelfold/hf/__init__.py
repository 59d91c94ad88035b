"""Hugging Face transformers support (adapters per model family)."""

from __future__ import annotations

from typing import Any


def is_supported(model: Any) -> bool:
    """True if ``model`` is a transformers model of a family modelfold knows."""
    return False

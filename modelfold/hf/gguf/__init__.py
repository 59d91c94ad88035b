"""GGUF output for llama.cpp / ollama: ``write`` (``save_gguf``: metadata, tensors, an atomic file) and
``layers`` (per-layer sizes, the llama.cpp architecture that can hold them, block-aligned widths).
GGUF input is read by transformers (``modelfold.hf.io.load_any``)."""

from .write import TYPES, GGUFInfo, save_gguf

__all__ = ["TYPES", "GGUFInfo", "save_gguf"]

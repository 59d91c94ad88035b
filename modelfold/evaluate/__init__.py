"""Measure a (folded) model: perplexity, embedding cosine, image top-1 and agreement.

Library functions shared by ``modelfold eval`` and the benchmark scripts; see docs/eval.md.
"""

from __future__ import annotations

from .images import image_agreement, image_folder, imagenet_images, load_images
from .text import (
    embedding_cosine,
    embedding_cosines,
    eval_windows,
    expects_bos,
    perplexity,
    sentence_embeddings,
    wiki_articles,
    wiki_sentences,
    wiki_split,
    wiki_text,
    window_nll,
    window_starts,
)

__all__ = ["embedding_cosine", "embedding_cosines", "eval_windows", "expects_bos", "image_agreement", "image_folder",
           "imagenet_images", "load_images", "perplexity",
           "sentence_embeddings", "window_nll", "window_starts", "wiki_articles", "wiki_sentences", "wiki_split",
           "wiki_text"]

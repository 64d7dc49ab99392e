"""Sparse embeddings whose rows live in server-side hash tables (docs/sparse.md).

``fastps.nn.Embedding`` and ``fastps.nn.EmbeddingBag`` replace their torch
namesakes; a ``fastps.optim`` optimizer over ``model.parameters()`` trains the
rows with the matching sparse rule at ``step()``.
"""

from ._backend import DistributedNotSupportedError
from .embedding import Embedding, EmbeddingBag

__all__ = ["Embedding", "EmbeddingBag", "DistributedNotSupportedError"]

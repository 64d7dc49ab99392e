"""Sparse embeddings whose rows live in server-side hash tables (docs/sparse.md).

``fastps.nn.Embedding`` and ``fastps.nn.EmbeddingBag`` replace their torch
namesakes; a ``fastps.optim`` optimizer over ``model.parameters()`` trains the
rows with the matching sparse rule at ``step()``.

``SparseOptim(SparseRule.<RULE>, lr=..., ...)`` passed as a module's
``optimizer=`` fixes the sparse rule and every hyperparameter of its rows
(docs/sparse.md, "Which rule")::

    emb = fastps.nn.Embedding(10**9, 64, optimizer=fastps.nn.SparseOptim(fastps.nn.SparseRule.FTRL, lr=0.05, l1=1e-3))
"""

from .._C import SparseOptim, SparseRule
from .embedding import Embedding, EmbeddingBag

__all__ = ["Embedding", "EmbeddingBag", "SparseOptim", "SparseRule"]

# The fastps demo: a small GPT trained data-parallel through the parameter server.
"""``fastps demo``: a byte-level GPT trained on Python's standard library source.

- :mod:`fastps.demo.model`: the model (plain torch modules).
- :mod:`fastps.demo.data`: the corpus and the deterministic batches.
- :mod:`fastps.demo.train`: the training script (``examples/train_gpt.py``).
- :mod:`fastps.demo.launch`: the local launcher behind ``fastps demo``.
- :mod:`fastps.demo.report`: summary table, curve agreement and loss plot.

See docs/demo.md.
"""

from .data import Corpus, load_corpus, train_batch
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "Corpus", "load_corpus", "train_batch"]

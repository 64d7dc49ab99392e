"""Drop-in replacements for ``torch.optim`` whose update runs on the parameter server.

Change ``torch.optim.AdamW(...)`` to ``fastps.optim.AdamW(...)``; nothing else.
"""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Adagrad"]

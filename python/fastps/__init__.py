# fastps public API: everything a user needs is re-exported here; anything not
# listed in __all__ (including the native module fastps._C) is private.
"""fastps: a high-performance parameter server for PyTorch.

Change ``torch.optim.AdamW(...)`` to ``fastps.optim.AdamW(...)`` and train as
before; see README.md.
"""

from ._version import __version__
from . import errors, nn, optim
from ._runtime import Config, init
from .client import Client, Future
from .distributed_optimizer import DistributedOptimizer
from .errors import (
    CapacityError,
    CheckpointError,
    ConnectionError,
    FastPSError,
    InvalidArgumentError,
    ProtocolError,
    TimeoutError,
    TransportUnavailableError,
)

__all__ = [
    "__version__",
    "optim",
    "nn",
    "errors",
    "init",
    "Config",
    "Client",
    "Future",
    "DistributedOptimizer",
    "FastPSError",
    "InvalidArgumentError",
    "TimeoutError",
    "ConnectionError",
    "ProtocolError",
    "CapacityError",
    "CheckpointError",
    "TransportUnavailableError",
]

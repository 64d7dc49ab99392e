"""The transports the multi-process tests run over, as pytest parameters.

``ucx`` runs wherever the UCX transport can load (this fastps was built with the
UCX headers and the system's libucp is present; CI installs Debian's libucx-dev)
and is skipped, saying why, elsewhere. Over loopback UCX needs its TCP transport
on ``lo``: conftest.py sets ``UCX_TLS=tcp,self`` and ``UCX_NET_DEVICES=lo``
unless the environment has them (docs/ucx.md), so the ucx runs exercise the
network path a cluster's remote peers take, not UCX's own shared memory.
"""

from __future__ import annotations

import pytest

from fastps import _C

UCX_LOOPBACK_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}


def ucx_param(*values, marks=()):
    """``pytest.param(*values)`` that skips, with the reason, where the ucx transport cannot load."""
    why = _C.ucx_unavailable()
    skip = [pytest.mark.skip(reason=f"ucx transport unavailable: {why}")] if why else []
    return pytest.param(*values, marks=list(marks) + skip, id="-".join(str(v) for v in values))

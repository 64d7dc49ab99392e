import os

import pytest
import torch
from _transports import UCX_LOOPBACK_ENV


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# UCX over loopback (tests/_transports.py, docs/ucx.md): its TCP transport on lo,
# for this process and every job it starts; a setting from the environment wins.
for _k, _v in UCX_LOOPBACK_ENV.items():
    os.environ.setdefault(_k, _v)

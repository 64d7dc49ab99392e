# Type stub of the private native module fastps._C (see src/bindings.cc).
# Tensors cross as integer addresses after python/fastps/_tensor.py checked them.
from typing import List

class OptimKind:
    SGD: "OptimKind"
    ADAM: "OptimKind"
    ADAGRAD: "OptimKind"

class OptimHyper:
    kind: OptimKind
    lr: float
    weight_decay: float
    maximize: bool
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    decoupled_weight_decay: bool
    lr_decay: float
    initial_accumulator_value: float
    def __init__(self) -> None: ...
    def state_count(self) -> int: ...
    def state_name(self, index: int) -> str: ...

def optim_kernel_isa() -> str: ...
def optim_update(hyper: OptimHyper, step: float, first_step: bool, param: int, grad: int,
                 state: List[int], numel: int, reference: bool = False) -> None: ...

class Server:
    def __init__(self, num_shards: int = 0) -> None: ...
    @property
    def num_shards(self) -> int: ...

class EmbeddedClient:
    def __init__(self, server: Server, chunk_bytes: int, timeout_s: float) -> None: ...
    @property
    def chunk_elems(self) -> int: ...
    def num_chunks(self, numel: int) -> int: ...
    def register_dense(self, tensor_id: int, param: int, numel: int, state: List[int], step: int,
                       fresh_state: bool) -> None: ...
    def unregister_dense(self, tensor_id: int) -> None: ...
    def is_registered(self, tensor_id: int) -> bool: ...
    def update(self, tensor_ids: List[int], grads: List[int], hyper_index: List[int],
               hypers: List[OptimHyper]) -> None: ...

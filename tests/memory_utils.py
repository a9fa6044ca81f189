"""Counting what a piece of code allocates, for memory tests that do not depend on the allocator."""

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest new tensor any ATen op returns while active (autograd's
    own zero gradients included; views of existing storage are not allocations)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                self.numel = max(self.numel, t.numel())
        return out

"""Live tensor bytes, measured the way ``torch.cuda.max_memory_allocated`` counts them on a GPU, for the exports'
and loading's peak-memory tests; the bytes a model holds."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def _plain(x):
    """The plain tensors holding ``x``'s data: a wrapper subclass (e.g. fastft's 4-bit experts) has no storage of
    its own; its inner tensors have."""
    if not is_traceable_wrapper_subclass(x):
        return [x]
    return [held for name in x.__tensor_flatten__()[0] for held in _plain(getattr(x, name))]


def held_bytes(model) -> int:
    """Bytes of the storages holding a model's parameters and buffers (a wrapper subclass's inner tensors), each
    storage counted once."""
    storages = {held.untyped_storage().data_ptr(): held.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] for held in _plain(t)}
    return sum(storages.values())


def _storage_ptrs(tree):
    return {(x.untyped_storage() if isinstance(x, torch.Tensor) else x).data_ptr()
            for leaf in tree_leaves(tree) if isinstance(leaf, (torch.Tensor, torch.UntypedStorage))
            for x in (_plain(leaf) if isinstance(leaf, torch.Tensor) else [leaf])}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the block that are still alive, and their peak: an op's
    output storage that none of its inputs had (not a view, not in place) counts once, until a
    ``weakref.finalize`` on it sees it freed. (What ``torch.cuda.max_memory_allocated`` counts on a GPU.)"""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storage_ptrs((args, kwargs))
        for leaf in tree_leaves(out):
            for tensor in _plain(leaf) if isinstance(leaf, torch.Tensor) else []:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._alive and key not in inputs:
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key, nbytes):
        self._alive.discard(key)
        self.live -= nbytes

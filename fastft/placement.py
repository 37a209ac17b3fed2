"""Where ``FastModel.from_pretrained`` puts a model: one GPU per rank under ``torchrun`` / ``accelerate launch``.

Every rank of a distributed job starts with GPU 0 as its current CUDA device; the trainer moves each rank to its
own GPU only later, after the model is loaded. So a model loaded onto "the current GPU" lands on GPU 0 on every
rank. The launchers set ``LOCAL_RANK`` (the rank's index on its machine): that GPU is the rank's.
"""
from __future__ import annotations

import os
import warnings

import torch

# device_map values by which accelerate spreads one model over all GPUs
_SPREADING_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def default_device() -> torch.device:
    """Where a model loaded without ``device_map`` goes: ``cuda:LOCAL_RANK`` under a distributed launcher, else the
    current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is None:
            return torch.device("cuda", torch.cuda.current_device())
        if not local_rank.isdigit():
            raise ValueError(f"LOCAL_RANK={local_rank!r} is not a GPU index; torchrun and accelerate launch set it "
                             "to the rank's index on its machine")
        return _visible_gpu(int(local_rank), f"LOCAL_RANK={local_rank} (this rank's GPU)",
                            "launch at most that many processes per machine (torchrun --nproc_per_node, "
                            "accelerate launch --num_processes)")
    from .kernels._common import INTERPRET

    if not INTERPRET:
        warnings.warn("fastft: no CUDA GPU found; the model runs fastft's plain PyTorch paths on the CPU (slow)",
                      stacklevel=3)
    return torch.device("cpu")


def device_of_map(device_map) -> torch.device:
    """Check that an explicit ``device_map`` names only GPUs that exist; return the device whose dtype support
    decides ``dtype=None`` (the first GPU it names, else the CPU)."""
    if isinstance(device_map, str) and device_map in _SPREADING_MAPS:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            warnings.warn(f"fastft: device_map={device_map!r} spreads each rank's model over all GPUs, which DDP and "
                          "FSDP cannot train; under torchrun / accelerate launch leave device_map=None (each rank then "
                          "loads onto its own GPU, cuda:LOCAL_RANK)", stacklevel=3)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gpus = []
    for where in (device_map.values() if isinstance(device_map, dict) else [device_map]):
        if isinstance(where, str) and where in ("cpu", "disk", "meta"):
            continue
        if isinstance(where, int):
            where = torch.device("cuda", where)  # accelerate's convention: an int is a GPU index
        elif where == "cuda":
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # what transformers makes of it
        try:
            where = torch.device(where)
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map names {where!r}, which is not a device; use e.g. 'cpu', 'cuda:0', 0 or "
                             "{'': 0}") from None
        if where.type == "cuda":
            index = where.index
            if index is None:
                index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            gpus.append(_visible_gpu(index, f"device_map={device_map!r}", "name a GPU that exists, or 'cpu'"))
    return gpus[0] if gpus else torch.device("cpu")


def _visible_gpu(index: int, asked_by: str, fix: str) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"{asked_by} asks for GPU {index}, but {count} CUDA GPU(s) are visible{shown}; {fix}")
    return torch.device("cuda", index)

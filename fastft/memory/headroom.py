"""The headroom between a GPU's memory and the accounted peak: one model, used wherever a figure meets a card.

fastft's accounted peak is what ``torch.cuda.max_memory_allocated`` would report. A real card gives a training
process less than its whole memory for that:

    usable = card - CUDA_CONTEXT_GIB - FRAGMENTATION_FRACTION x card

**The CUDA context** (``CUDA_CONTEXT_GIB``, 0.75 GiB): the driver's context and the kernels loaded into it, the
memory ``nvidia-smi`` shows a process using before it allocates a tensor. Published measurements with lazy
module loading (``CUDA_MODULE_LOADING=LAZY``, PyTorch's default since 1.13): 287,047,680 bytes (PyTorch pull
request #86509, torch 1.13, context plus one tensor) against 666,632,192 bytes when every kernel is loaded at
once (the same pull request, ``CUDA_MODULE_LOADING=DEFAULT`` then); "around 400MB if CUDA >= 11.7" (pytorch
issue #109888, 2023); 426 MiB for ``torch.cuda.mem_get_info`` alone with torch 2.10+cu130 on an RTX 6000 Ada
(unsloth-zoo pull request #1053, 2026). A training step then loads kernels lazily (cuBLAS / cuBLASLt, SDPA's
flash kernels, fastft's Triton kernels, bitsandbytes), and cuBLAS keeps a workspace per handle (32 MiB on
Hopper with torch's default ``CUBLAS_WORKSPACE_CONFIG``), so the eager-loading figure, 636 MiB, plus a
workspace is taken as the bound: 0.75 GiB. Not measured by fastft on a GPU (none has been lent).

**The caching allocator's rounding and fragmentation** (``FRAGMENTATION_FRACTION``, 8% of the card): what
``max_memory_reserved`` holds beyond ``max_memory_allocated``. PyTorch's ``CUDACachingAllocator``
(``c10/cuda/CUDACachingAllocator.cpp``) rounds every request up to a multiple of 512 bytes
(``kMinBlockSize``), serves requests of up to 1 MiB (``kSmallSize``) from 2 MiB segments (``kSmallBuffer``),
requests of 1-10 MiB from 20 MiB segments (``kLargeBuffer``, below ``kMinLargeAlloc``), and rounds larger
ones up to a multiple of 2 MiB (``kRoundLarge``); a cached block is split to serve a smaller request, and a
freed block whose neighbour is still live cannot serve a larger one: the reserved-but-unallocated memory that
PyTorch's out-of-memory message reports. It grows with what the step allocates, which at the limit is the card,
hence a fraction of the card. 8% is the margin fastft's ``use_gradient_checkpointing="auto"`` has kept from the
start (:func:`fastft.checkpointing.gpu_budget_gb`); it is a judgement, not a measurement: ``bench/memory.py
--gpu-check`` measures the reserved memory of real steps when a GPU is lent. ``PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True`` removes most of the fragmentation, so the figures are on the safe side with it.

The raw comparison (the accounted peak against the whole card) stays available: ``headroom=False`` in
:func:`fastft.max_context` and ``MemoryEstimate.fits``, ``fastft-memory --raw``, ``bench/memory.py --raw``. Every
output says which of the two it shows.
"""
from __future__ import annotations

CUDA_CONTEXT_GIB = 0.75
FRAGMENTATION_FRACTION = 0.08


def reserve_gib(card_gib: float, context_gib: float = CUDA_CONTEXT_GIB) -> float:
    """What the headroom keeps back from a card of ``card_gib`` GiB."""
    return context_gib + FRAGMENTATION_FRACTION * card_gib


def usable_gib(card_gib: float, context_gib: float = CUDA_CONTEXT_GIB) -> float:
    """What the accounted peak may reach on a card of ``card_gib`` GiB (0 when the headroom takes it all).
    ``context_gib=0`` where the memory was read with the context already taken (``torch.cuda.mem_get_info``)."""
    return max(0.0, card_gib - reserve_gib(card_gib, context_gib))


def card_gib_for(peak_gib: float) -> float:
    """The smallest card on which an accounted peak of ``peak_gib`` GiB fits with the headroom."""
    return (peak_gib + CUDA_CONTEXT_GIB) / (1 - FRAGMENTATION_FRACTION)


def describe() -> str:
    """The headroom in words, as the outputs state it."""
    return (f"headroom: {CUDA_CONTEXT_GIB:g} GiB CUDA context + {FRAGMENTATION_FRACTION:.0%} of the card for the "
            "caching allocator's rounding and fragmentation (fastft/memory/headroom.py)")


def as_dict(applied: bool) -> dict:
    """The headroom for a results file: its figures and whether the figures beside it apply it."""
    return {"applied": applied, "cuda_context_gib": CUDA_CONTEXT_GIB,
            "fragmentation_fraction_of_card": FRAGMENTATION_FRACTION}

"""The memory plan of ``use_gradient_checkpointing="auto"``: the fastest configuration whose accounted peak fits.

Memory-saving settings, from the cheapest in time to the dearest:

1. checkpoint only ``k`` of the ``L`` decoder layers: each layer not recomputed saves a third of its forward
   work, and costs its activations. The peak falls about linearly with ``k``: the smallest ``k`` that fits is
   found from the two ends and confirmed by the accounting;
2. all layers, checkpoints offloaded to pinned host memory (a copy to the host per layer in the forward and
   back in the backward, overlapping compute on a GPU);
3. in addition, the MLP in token chunks (``lora_mlp(chunk_tokens=...)``): its ``[T, intermediate]``
   tensors stop growing with the length, at the price of recomputing gate and up in the backward. The
   largest chunk (of 16k, 8k, 4k, 2k, 1k tokens) that fits. Not for mixture-of-experts models (their blocks
   are not chunked: ``mlp_chunk_tokens`` does not apply to them).

When even the last does not fit, the plan is that last setting with ``fits=False`` (and the caller warns).
Each step of the search is one accounting of the training step (seconds for an 8B model on a CPU).
"""
from __future__ import annotations

import dataclasses

from ..moe import is_moe_config
from .estimate import estimate_memory

MLP_CHUNKS = (16384, 8192, 4096, 2048, 1024)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    checkpointed_layers: int
    num_layers: int
    offload: bool
    mlp_chunk_tokens: int | None
    peak_gb: float  # accounted
    budget_gb: float
    tokens: int

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.budget_gb

    def describe(self) -> str:
        what = f"checkpointing {self.checkpointed_layers} of {self.num_layers} layers"
        if self.offload:
            what += ", checkpoints offloaded to host memory"
        if self.mlp_chunk_tokens:
            what += f", MLP in chunks of {self.mlp_chunk_tokens} tokens"
        verdict = "fits" if self.fits else "does NOT fit (the most memory-saving setting fastft has)"
        return (f"memory plan for {self.tokens:,} tokens per step: {what}; accounted peak {self.peak_gb:.2f} GiB "
                f"{verdict} the budget of {self.budget_gb:.2f} GiB")


def plan_memory(config, max_seq_length: int, batch_size: int, budget_gb: float, **settings) -> MemoryPlan:
    """The plan (see the module doc) for ``batch_size`` sequences of ``max_seq_length`` tokens in
    ``budget_gb`` GiB. ``settings``: LoRA settings and dtype as :func:`fastft.estimate_memory` takes them."""
    if not budget_gb > 0:
        raise ValueError(f"memory_budget_gb must be positive, got {budget_gb!r}")
    num_layers = config.num_hidden_layers

    def peak(checkpointing, chunk=None) -> float:
        return estimate_memory(config, max_seq_length, batch_size=batch_size, use_gradient_checkpointing=checkpointing,
                               mlp_chunk_tokens=chunk, **settings).peak_gb

    def plan(layers, offload=False, chunk=None, peak_gb=None) -> MemoryPlan:
        return MemoryPlan(layers, num_layers, offload, chunk, peak_gb, budget_gb, max_seq_length * batch_size)

    none, every = peak(0), peak(num_layers)
    if none <= budget_gb:
        return plan(0, peak_gb=none)
    if every <= budget_gb:
        per_layer = (none - every) / num_layers  # what checkpointing one more layer saves
        layers = min(num_layers, max(1, int((none - budget_gb) / per_layer + 0.999)))
        found = peak(layers)
        while found > budget_gb and layers < num_layers:  # the estimate was short: one more layer at a time
            layers += 1
            found = peak(layers) if layers < num_layers else every
        while layers > 1:  # the estimate was long: fewer layers while they fit
            fewer = peak(layers - 1)
            if fewer > budget_gb:
                break
            layers, found = layers - 1, fewer
        return plan(layers, peak_gb=found)
    offloaded = peak("offload")
    if offloaded <= budget_gb:
        return plan(num_layers, offload=True, peak_gb=offloaded)
    chunk_peak = None
    for chunk in () if is_moe_config(config) else MLP_CHUNKS:
        if chunk >= max_seq_length * batch_size:
            continue
        chunk_peak = peak("offload", chunk)
        if chunk_peak <= budget_gb:
            return plan(num_layers, offload=True, chunk=chunk, peak_gb=chunk_peak)
    smallest = MLP_CHUNKS[-1] if chunk_peak is not None else None
    return plan(num_layers, offload=True, chunk=smallest, peak_gb=chunk_peak if chunk_peak is not None else offloaded)

"""Gradient checkpointing of a fastft model, and the memory plan behind ``use_gradient_checkpointing="auto"``.

``FastModel.get_peft_model(use_gradient_checkpointing=...)`` takes:

* ``True``: every decoder layer is checkpointed (its input kept, the rest recomputed in the backward);
* ``False``: none (fastest, most memory);
* an int ``k``: the first ``k`` layers (each layer not recomputed saves a third of its forward work);
* ``"offload"``: every layer, the checkpoints in pinned host memory (transformers' offloading);
* ``"auto"``: as little as fits ``memory_budget_gb`` (default: what the GPU has for this process) at
  ``max_seq_length x batch_size`` tokens per step, decided by fastft's memory accounting
  (``fastft.memory.plan``): fewest checkpointed layers, then offloading, then the MLP in token chunks.

The choice is kept on the model: trainers re-enable checkpointing with their own arguments (TRL does after
each reference pass), and the model re-applies its own plan then.
"""
from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger("fastft")

MODES = (True, False, "offload", "auto")


def check_mode(mode, num_layers: int):
    """``mode`` if it is one of :data:`MODES` or a layer count in ``[0, num_layers]``, else a ValueError."""
    if isinstance(mode, bool) or mode in ("offload", "auto"):
        return mode
    if isinstance(mode, int) and 0 <= mode <= num_layers:
        return mode
    raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload', 'auto' or a number of layers in "
                     f"[0, {num_layers}], got {mode!r}")


def apply_checkpointing(model, layers: int, offload: bool = False) -> None:
    """Checkpoint the first ``layers`` decoder layers of ``model`` (a patched ``*ForCausalLM``), their
    checkpoints offloaded to host memory when ``offload`` (all layers only). Kept through trainers'
    re-enabling."""
    decoder_layers = model.model.layers
    if offload and model.device.type == "cpu":  # the activations are in host memory already
        logger.warning("fastft: use_gradient_checkpointing='offload' on a CPU model is plain checkpointing")
        offload = False
    if layers == 0:
        model.__dict__.pop("gradient_checkpointing_enable", None)
        transformers_method(model, "disable")()
        return
    # transformers' own "checkpoint every layer" (not the public method: the override below is reached through it)
    enable_every_layer = (getattr(type(model), "_activation_checkpointing_enable", None)
                          or type(model).gradient_checkpointing_enable)  # transformers < 5.23

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, **_):
        enable_every_layer(self, gradient_checkpointing_kwargs, 1, offload=offload)
        for index, layer in enumerate(decoder_layers):
            layer.gradient_checkpointing = index < layers

    # the name trainers call (transformers >= 5.23 reach it through activation_checkpointing_enable)
    model.gradient_checkpointing_enable = types.MethodType(gradient_checkpointing_enable, model)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()


def transformers_method(model, action: str):
    """``model``'s checkpointing ``action`` ("enable" or "disable") under its current name: transformers 5.23
    renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old names warn)."""
    current = getattr(model, f"activation_checkpointing_{action}", None)
    return current or getattr(model, f"gradient_checkpointing_{action}")


def set_mlp_chunk_tokens(model, chunk_tokens: int | None) -> None:
    """Run every MLP of ``model`` in chunks of ``chunk_tokens`` tokens (None: whole sequences)."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"mlp_chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    for layer in model.model.layers:
        layer.mlp._fastft_mlp_chunk_tokens = chunk_tokens


def gpu_budget_gb(device: torch.device) -> float:
    """What the GPU holds for this process's tensors: free memory plus what it has allocated already, less
    8% for the caching allocator's rounding and fragmentation (not in the accounting)."""
    free, _ = torch.cuda.mem_get_info(device)
    return 0.92 * (free + torch.cuda.memory_allocated(device)) / 2**30


def apply_mode(model, mode, *, max_seq_length: int, batch_size: int, memory_budget_gb, mlp_chunk_tokens,
               lora_settings: dict):
    """Apply a checked ``use_gradient_checkpointing`` mode to ``model``; ``"auto"`` plans it first.
    Returns the :class:`fastft.memory.plan.MemoryPlan` for ``"auto"``, else None."""
    num_layers = len(model.model.layers)
    if mode != "auto":
        if memory_budget_gb is not None:
            raise ValueError("memory_budget_gb is read only with use_gradient_checkpointing='auto'")
        if isinstance(mode, bool) or mode == "offload":  # a bool before an int: True == 1
            layers = num_layers if mode else 0
        else:
            layers = mode
        apply_checkpointing(model, layers, offload=mode == "offload")
        set_mlp_chunk_tokens(model, mlp_chunk_tokens)
        return None
    from .memory.plan import plan_memory

    if mlp_chunk_tokens is not None:
        raise ValueError("mlp_chunk_tokens is chosen by the plan under use_gradient_checkpointing='auto'")
    if memory_budget_gb is None:
        if model.device.type != "cuda":
            raise ValueError("use_gradient_checkpointing='auto' on a model without a GPU needs memory_budget_gb "
                             "(the GPU memory to plan for, in GiB)")
        memory_budget_gb = gpu_budget_gb(model.device)
    plan = plan_memory(model.config, max_seq_length, batch_size, memory_budget_gb, **lora_settings)
    logger.warning(f"fastft: {plan.describe()}")
    apply_checkpointing(model, plan.checkpointed_layers, offload=plan.offload)
    set_mlp_chunk_tokens(model, plan.mlp_chunk_tokens)
    return plan

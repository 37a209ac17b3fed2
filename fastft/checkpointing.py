"""Gradient checkpointing of a fastft model, and the memory plan behind ``use_gradient_checkpointing="auto"``.

``FastModel.get_peft_model(use_gradient_checkpointing=...)`` takes:

* ``True``: every decoder layer is checkpointed (its input kept, the rest recomputed in the backward);
* ``False``: none (fastest, most memory);
* an int ``k``: the first ``k`` layers (each layer not recomputed saves a third of its forward work);
* ``"offload"``: every layer, the checkpoints in pinned host memory (transformers' offloading);
* ``"auto"``: as little as fits ``memory_budget_gb`` (default: what the GPU has for this process) at
  ``max_seq_length x batch_size`` tokens per step, decided by fastft's memory accounting
  (``fastft.memory.plan``): fewest checkpointed layers, then offloading, then the MLP in token chunks.

The choice is kept on the model: trainers enable checkpointing with their own arguments (the Trainer's
``gradient_checkpointing=True``, TRL's default; TRL again after each reference pass), and the model re-applies its
own plan then, for no checkpointed layer as for k.
"""
from __future__ import annotations

import logging
import math
import types

import torch

from . import reach_ins
from .memory.headroom import usable_gib

logger = logging.getLogger("fastft")

MODES = (True, False, "offload", "auto")


def check_settings(model, mode, *, memory_budget_gb, mlp_chunk_tokens, batch_size):
    """Check ``get_peft_model``'s checkpointing arguments for ``model`` before anything changes it (a refused call
    must leave the model as it was, so that the corrected call works); returns ``mode``. ``mode``: one of
    :data:`MODES` or a layer count in ``[0, num_layers]``."""
    num_layers = len(model.model.layers)
    if not (isinstance(mode, bool) or mode in ("offload", "auto") or isinstance(mode, int) and 0 <= mode <= num_layers):
        raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload', 'auto' or a number of layers "
                         f"in [0, {num_layers}], got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if mode != "auto":
        if memory_budget_gb is not None:
            raise ValueError("memory_budget_gb is read only with use_gradient_checkpointing='auto'")
        _check_mlp_chunk_tokens(mlp_chunk_tokens)
        return mode
    from .memory.estimate import MAX_ACCOUNTED_TOKENS

    if mlp_chunk_tokens is not None:
        raise ValueError("mlp_chunk_tokens is chosen by the plan under use_gradient_checkpointing='auto'")
    if memory_budget_gb is None:
        if model.device.type != "cuda":
            raise ValueError("use_gradient_checkpointing='auto' on a model without a GPU needs memory_budget_gb "
                             "(the GPU memory to plan for, in GiB)")
    elif isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, (int, float)) \
            or not 0 < memory_budget_gb < math.inf:
        raise ValueError(f"memory_budget_gb must be positive (GiB), got {memory_budget_gb!r}")
    if model.max_seq_length * batch_size > MAX_ACCOUNTED_TOKENS:
        raise ValueError(f"use_gradient_checkpointing='auto' plans with fastft's memory accounting, which simulates "
                         f"at most {MAX_ACCOUNTED_TOKENS:,} tokens per step; max_seq_length x batch_size is "
                         f"{model.max_seq_length:,} x {batch_size}. Pass use_gradient_checkpointing='offload' (with "
                         "mlp_chunk_tokens) instead")
    return mode


def apply_checkpointing(model, layers: int, offload: bool = False) -> None:
    """Checkpoint the first ``layers`` decoder layers of ``model`` (a patched ``*ForCausalLM``), their
    checkpoints offloaded to host memory when ``offload`` (all layers only).

    The plan holds whatever a trainer asks for later: the Trainer's ``gradient_checkpointing=True`` (TRL's
    default) and TRL's re-enabling after each reference pass reach ``gradient_checkpointing_enable``, which this
    replaces on the instance (for 0 layers too) by one that re-applies the plan, passing the trainer's
    checkpoint arguments (``use_reentrant``, ...) on; the first request that differs from the plan is logged."""
    decoder_layers = model.model.layers
    if offload and model.device.type == "cpu":  # the activations are in host memory already
        logger.warning("fastft: use_gradient_checkpointing='offload' on a CPU model is plain checkpointing")
        offload = False
    plan = ([index < layers for index in range(len(decoder_layers))], offload)
    # transformers' own "checkpoint every layer" (not the public method: the override below is reached through it)
    enable_every_layer = reach_ins.read(reach_ins.ACTIVATION_CHECKPOINTING_ENABLE, type(model))

    def keep_plan(checkpoint_kwargs=None):
        if not layers:
            transformers_method(model, "disable")()
            return
        enable_every_layer(model, checkpoint_kwargs, 1, offload=offload)
        for layer, checkpointed in zip(decoder_layers, plan[0]):
            layer.gradient_checkpointing = checkpointed

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False, **_):
        asked = ([index % every_n_layers == 0 for index in range(len(decoder_layers))], offload)
        if asked != plan and not getattr(self, "_fastft_plan_kept_noted", False):
            self._fastft_plan_kept_noted = True
            logger.warning(f"fastft: the trainer asked for gradient checkpointing of {_describe(*asked)}; this model "
                           f"keeps its own plan, {_describe(*plan)} (use_gradient_checkpointing of "
                           "FastModel.get_peft_model)")
        keep_plan(gradient_checkpointing_kwargs)

    # the name trainers call (transformers >= 5.23 reach it through activation_checkpointing_enable)
    model.gradient_checkpointing_enable = types.MethodType(gradient_checkpointing_enable, model)
    keep_plan()
    if layers:
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed layers' inputs must need grad


def _describe(checkpointed: list[bool], offload: bool) -> str:
    count = sum(checkpointed)
    layers = "every layer" if count == len(checkpointed) else f"{count} of {len(checkpointed)} layers"
    return layers + (", offloaded" if offload and count else "")


def transformers_method(model, action: str):
    """``model``'s checkpointing ``action`` ("enable" or "disable") under its current name: transformers 5.23
    renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old names warn)."""
    current = getattr(model, f"activation_checkpointing_{action}", None)
    return current or getattr(model, f"gradient_checkpointing_{action}")


def set_mlp_chunk_tokens(model, chunk_tokens: int | None) -> None:
    """Run every MLP of ``model`` in chunks of ``chunk_tokens`` tokens (None: whole sequences)."""
    _check_mlp_chunk_tokens(chunk_tokens)
    for layer in model.model.layers:
        layer.mlp._fastft_mlp_chunk_tokens = chunk_tokens


def _check_mlp_chunk_tokens(chunk_tokens) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"mlp_chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def gpu_budget_gb(device: torch.device) -> float:
    """What the GPU holds for this process's tensors: free memory plus what it has allocated already, less the
    headroom of ``fastft.memory.headroom`` without its CUDA context, which the free memory has already lost."""
    free, _ = torch.cuda.mem_get_info(device)
    return usable_gib((free + torch.cuda.memory_allocated(device)) / 2**30, context_gib=0)


def apply_mode(model, mode, *, max_seq_length: int, batch_size: int, memory_budget_gb, mlp_chunk_tokens,
               lora_settings: dict):
    """Apply a ``use_gradient_checkpointing`` mode, checked with its arguments by :func:`check_settings`, to
    ``model``; ``"auto"`` plans it first. Returns the :class:`fastft.memory.plan.MemoryPlan` for ``"auto"``, else
    None."""
    num_layers = len(model.model.layers)
    if mode != "auto":
        if isinstance(mode, bool) or mode == "offload":  # a bool before an int: True == 1
            layers = num_layers if mode else 0
        else:
            layers = mode
        apply_checkpointing(model, layers, offload=mode == "offload")
        set_mlp_chunk_tokens(model, mlp_chunk_tokens)
        return None
    from .memory.plan import plan_memory

    if memory_budget_gb is None:
        memory_budget_gb = gpu_budget_gb(model.device)
    plan = plan_memory(model.config, max_seq_length, batch_size, memory_budget_gb, **lora_settings)
    logger.warning(f"fastft: {plan.describe()}")
    apply_checkpointing(model, plan.checkpointed_layers, offload=plan.offload)
    set_mlp_chunk_tokens(model, plan.mlp_chunk_tokens)
    return plan

"""The dtype of a fastft model's trainable parameters: chosen by ``FastModel.get_peft_model``, kept through TRL.

* bf16 model: the LoRA adapters (and ``modules_to_save`` copies) in bf16, as TRL's QLoRA recipe casts them; the
  fused kernels read them as they are.
* fp16 model (what ``dtype=None`` picks on V100 and T4): fp32 master weights. In fp16 an update below half an ulp
  of its weight is lost, Adam's second moment of a small gradient underflows to 0 (its ``eps=1e-8`` is 0 in fp16
  too, so the step divides 0 by 0), and ``GradScaler`` refuses fp16 parameters. The fused LoRA path computes with
  fp16 copies made at each call (``fastft.quant.lora_args_of``; the gradient flows back through the cast to the
  fp32 parameters); a ``modules_to_save`` copy computes in fp32 and hands the model's dtype on.
* fp32 model: fp32.

TRL's ``SFTTrainer`` and ``DPOTrainer`` cast every trainable parameter of a 4-bit model to bf16 in ``__init__``
(trl 1.16 ``sft_trainer.py`` / ``dpo_trainer.py``: "the PEFT adapter weights are converted to bf16", whatever
``fp16`` / ``bf16`` say). On a GPU without bf16 that is wrong, it defeats fp16's master weights, and in an fp32
model it leaves bf16 ``modules_to_save`` copies whose forward fails outside the trainer's autocast ("expected m1
and m2 to have the same dtype"). :func:`install` wraps both trainers' ``__init__``: for a fastft model the
trainable parameters get back the dtypes chosen here after TRL's cast (with the values the cast rounded), and one
log line says so.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from . import reach_ins

logger = logging.getLogger("fastft")
_GUARD = "_fastft_keeps_trainable_dtypes"


def trainable_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype fastft trains parameters in, in a model computing in ``model_dtype``."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def set_trainable_dtypes(peft_model, model_dtype: torch.dtype, before_cast: dict | None = None) -> int:
    """Give every trainable floating-point parameter of ``peft_model`` (a model computing in ``model_dtype``) the
    dtype of :func:`trainable_dtype`. ``before_cast``: ``id(param) -> (param, data)`` taken before someone else
    cast the parameters; a parameter found there gets that data back, not a second rounding. In an fp16 model,
    the ``modules_to_save`` copies then compute in fp32 (:func:`_compute_in_fp32`). Returns how many changed."""
    from peft.utils.other import ModulesToSaveWrapper

    dtype, before_cast = trainable_dtype(model_dtype), before_cast or {}
    changed = 0
    for param in peft_model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            _, data = before_cast.get(id(param), (None, None))
            param.data = data if data is not None and data.dtype == dtype else param.data.to(dtype)
            changed += 1
    if dtype != model_dtype:
        for wrapper in peft_model.modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                for copy in wrapper.modules_to_save.values():
                    if any(p.requires_grad and p.dtype == dtype for p in copy.parameters()):
                        _compute_in_fp32(copy, model_dtype)
    return changed


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    return value


def _compute_in_fp32(module: torch.nn.Module, model_dtype: torch.dtype) -> None:
    """Let ``module``, holding fp32 master weights in a ``model_dtype`` model, run there: its floating-point inputs
    are cast to fp32 and its floating-point outputs back to ``model_dtype`` (both differentiable). Under autocast
    its matmuls still run in the autocast dtype. Once per module."""
    if getattr(module, _GUARD, False):
        return
    module.register_forward_pre_hook(lambda _, args, kwargs: _cast_floats((args, kwargs), torch.float32),
                                     with_kwargs=True)
    module.register_forward_hook(lambda _, args, output: _cast_floats(output, model_dtype))
    setattr(module, _GUARD, True)


def _fastft_causal_lm(model):
    if model is None or isinstance(model, str):
        return None
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm if getattr(causal_lm, "_fastft_patched", False) else None


def _keeping_trainable_dtypes(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        model = signature.bind(self, *args, **kwargs).arguments.get("model")
        causal_lm = _fastft_causal_lm(model)
        if causal_lm is None:
            return init(self, *args, **kwargs)
        model_dtype = causal_lm.dtype
        before_cast = {id(p): (p, p.data) for p in model.parameters() if p.requires_grad}
        init(self, *args, **kwargs)
        if set_trainable_dtypes(self.model, model_dtype, before_cast):
            logger.warning(f"fastft: {type(self).__name__} cast the trainable parameters of this 4-bit model to "
                           f"bfloat16; fastft keeps them in {str(trainable_dtype(model_dtype)).removeprefix('torch.')} "
                           f"(this model computes in {str(model_dtype).removeprefix('torch.')}; see "
                           "fastft/master_weights.py)")

    setattr(__init__, _GUARD, True)
    return __init__


def install() -> None:
    """Wrap ``__init__`` of ``trl.SFTTrainer`` and ``trl.DPOTrainer`` (idempotent; models fastft did not patch
    go through TRL unchanged)."""
    for entry in (reach_ins.SFT_INIT_DTYPES, reach_ins.DPO_INIT_DTYPES):
        init = reach_ins.get(entry)
        if not getattr(init, _GUARD, False):
            reach_ins.install(entry, _keeping_trainable_dtypes(init))

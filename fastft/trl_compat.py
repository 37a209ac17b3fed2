"""Serve TRL's fused lm-head path with fastft's log-prob kernel.

TRL >= 1.16 computes SFT and DPO losses without ``ForCausalLM.forward``: ``add_fused_lm_head`` replaces
the model's forward, and ``model(..., fused_lm_head=True)`` runs the backbone, then TRL's own chunked
kernel ``_ChunkedLogProbFunction`` on ``(hidden, lm_head.weight, labels)`` for per-token log-probs. A loss
patched into ``ForCausalLM.forward`` never runs there. fastft therefore installs, once per process, a
dispatcher in place of that name in ``trl.trainer.utils``: calls whose ``lm_head.weight`` belongs to a
fastft model (tagged by :func:`tag_lm_head`) run ``fastft.kernels.linear_log_probs``, which computes the
same five per-token outputs (log-probs, entropy, log-sum of squared probs, mean logit, top-1 flag; SFT and
DPO ask for log-probs plus metric fields), Gemma 2's soft-capped logits included; every other call (other
models) goes to TRL's kernel unchanged, so models that fastft did not patch behave exactly as before, and so do
fastft models with ``linear_log_probs`` disabled (``disable_kernels`` / ``FASTFT_DISABLE_KERNELS``).
"""
from __future__ import annotations

import torch

from . import master_weights, reach_ins, trl_dataset_checks
from .kernels.linear_log_probs import OUTPUTS, linear_log_probs  # OUTPUTS: TRL's per-token fields, its order
from .quant import is_dtensor

_TAG = "_fastft_lm_head"


def tag_lm_head(model, serve: bool = True):
    """Mark ``model.lm_head.weight`` as a fastft model's, at every forward of the backbone; returns the hook.
    ``serve=False`` (``linear_log_probs`` disabled for this model) marks it as one TRL's own kernel serves.

    Tagging once is not enough under FSDP2: ``fully_shard`` replaces the weight by a sharded DTensor
    parameter, which TRL gathers with ``weight.full_tensor()`` into a new tensor at every call. So the tag is
    set on whatever ``lm_head.weight`` is after the backbone has run, and a DTensor's gathered copy is tagged too.
    """

    def tag(*_):
        weight = model.lm_head.weight
        setattr(weight, _TAG, serve)
        if is_dtensor(weight) and "full_tensor" not in weight.__dict__:
            def full_tensor(*args, **kwargs):
                gathered = type(weight).full_tensor(weight, *args, **kwargs)
                setattr(gathered, _TAG, serve)
                return gathered

            weight.full_tensor = full_tensor

    tag()
    return model.model.register_forward_hook(tag)


class FastftLogProbDispatch:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction`` (same ``apply`` signature)."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    @property
    def forward(self):
        """TRL's own ``forward``: what :mod:`fastft.reach_ins` checks the parameters of."""
        return self.trl_function.forward

    def apply(self, hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping, logit_scale,
              outputs):
        served = getattr(weight, _TAG, False) and set(outputs) <= set(OUTPUTS)
        if not served:
            return self.trl_function.apply(hidden, weight, bias, labels, temperature, chunk_size,
                                           final_logit_softcapping, logit_scale, outputs)
        result = linear_log_probs(hidden, weight, labels, bias=bias, temperature=temperature,
                                  logit_scale=logit_scale, softcap=final_logit_softcapping, outputs=tuple(outputs))
        # a lone tensor when only log-probs were asked for, else TRL's 5-tuple
        return (result, None, None, None, None) if isinstance(result, torch.Tensor) else result


def install() -> None:
    """Put the dispatcher and the dataset checks (``trl_dataset_checks``) in place (idempotent). Without TRL
    installed there is nothing to do; a TRL without what fastft hooks into gets a clear error naming the
    supported range."""
    try:
        import trl.trainer.utils  # noqa: F401
    except ImportError:
        return
    for entry in (reach_ins.TRL_CHUNKED_LOG_PROB, reach_ins.TRL_ADD_FUSED_LM_HEAD, reach_ins.SFT_PREPARE_DATASET,
                  reach_ins.DPO_PREPARE_DATASET):
        reach_ins.check(entry)
    trl_dataset_checks.install()
    master_weights.install()
    current = reach_ins.get(reach_ins.TRL_CHUNKED_LOG_PROB)
    if not isinstance(current, FastftLogProbDispatch):
        reach_ins.install(reach_ins.TRL_CHUNKED_LOG_PROB, FastftLogProbDispatch(current))

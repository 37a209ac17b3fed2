"""Serve TRL's fused lm-head path with fastft's log-prob kernel.

TRL >= 1.16 computes SFT and DPO losses without ``ForCausalLM.forward``: ``add_fused_lm_head`` replaces
the model's forward, and ``model(..., fused_lm_head=True)`` runs the backbone, then TRL's own chunked
kernel ``_ChunkedLogProbFunction`` on ``(hidden, lm_head.weight, labels)`` for per-token log-probs. A loss
patched into ``ForCausalLM.forward`` never runs there. fastft therefore installs, once per process, a
dispatcher in place of that name in ``trl.trainer.utils``: calls whose ``lm_head.weight`` belongs to a
fastft model (tagged by :func:`tag_lm_head`) and ask only for log-probs run
``fastft.kernels.linear_log_probs``; every other call goes to TRL's kernel unchanged, so models that
fastft did not patch behave exactly as before.
"""
from __future__ import annotations

import torch

from .kernels.linear_log_probs import linear_log_probs

SUPPORTED_TRL = ">=1.16,<2"
_TAG = "_fastft_lm_head"


def tag_lm_head(weight: torch.Tensor) -> None:
    setattr(weight, _TAG, True)


class FastftLogProbDispatch:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction`` (same ``apply`` signature)."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    def apply(self, hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping, logit_scale,
              outputs):
        served = getattr(weight, _TAG, False) and final_logit_softcapping is None and tuple(outputs) == ("log_probs",)
        if not served:
            return self.trl_function.apply(hidden, weight, bias, labels, temperature, chunk_size,
                                           final_logit_softcapping, logit_scale, outputs)
        log_probs = linear_log_probs(hidden, weight, labels, bias=bias, temperature=temperature,
                                     logit_scale=logit_scale)
        return log_probs, None, None, None, None


def install() -> None:
    """Put the dispatcher in place (idempotent). Without TRL installed there is nothing to do; a TRL whose
    fused lm-head path is not where fastft expects it gets a clear error naming the supported range."""
    try:
        import trl
        import trl.trainer.utils as trl_utils
    except ImportError:
        return
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if isinstance(current, FastftLogProbDispatch):
        return
    if current is None or not hasattr(trl_utils, "add_fused_lm_head"):
        raise ImportError(
            f"fastft serves TRL's fused lm-head path of trl{SUPPORTED_TRL}; the installed trl {trl.__version__} "
            "has no trl.trainer.utils._ChunkedLogProbFunction / add_fused_lm_head. Install a supported trl."
        )
    trl_utils._ChunkedLogProbFunction = FastftLogProbDispatch(current)

"""Cross-entropy over a large vocabulary: Triton forward (online log-sum-exp) and Triton backward.

Forward, per row ``x`` of ``V`` logits with label ``y`` (fp32 math whatever the logits' dtype)::

    lse  = log(sum_j exp(x_j))            # one pass over the row in BLOCK_V chunks, online:
                                          #   m' = max(m, max(chunk)); s' = s*exp(m-m') + sum(exp(chunk-m'))
    loss = lse - x_y                      # 0 where y == ignore_index; lse saved per row (fp32)

    reduction "none": loss per row [N];  "sum": sum(loss);  "mean": sum(loss) / n_valid
    (n_valid = number of labels != ignore_index; when it is 0 the mean is 0, not NaN)

    -inf logits (a masked vocabulary) get probability 0. A row with NO finite logit has no distribution:
    its lse is -inf, its loss +inf and its gradient 0 (both engines).

    soft-cap c (Gemma 2's final_logit_softcapping): the loss of z = c * tanh(x / c) instead of x, computed
    from the raw logits in fp32; dx_j = dz_j * (1 - tanh^2(x_j / c)). -inf logits become -c.

Backward, with ``g`` the incoming gradient (a scalar for mean/sum, per row for none)::

    dx_j = (softmax(x)_j - [j == y]) * g * scale      # scale = 1/n_valid for mean, else 1
    dx   = 0 on ignored rows;  written in the logits' dtype

The kernels are the vocabulary-row pair of ``vocab_rows`` with ``NLL`` set (the loss ``lse - x_y``, not the
log-prob): ``ce_forward_rows`` / ``ce_backward_rows`` launch it, here and for ``fused_linear_cross_entropy``.
Their knobs beyond plain cross-entropy: ``z_scale`` (the rows are ``z = x * z_scale``), a vocabulary chunk
``[vocab_start, vocab_start + n_cols)`` of the row folded into running statistics (``first`` / ``last``), and a
``dlogits`` that aliases ``logits`` or has another dtype (fp32 logits in, bf16 gradient out, for a bf16 GEMM).
"""
from __future__ import annotations

import torch

from ._common import check_same_device, check_tensor, empty, use_triton
from .vocab_rows import backward_rows, check_labels, forward_rows, rows_torch, transform_torch

_REDUCTIONS = ("mean", "sum", "none")


def ce_forward_rows(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, loss: torch.Tensor,
    target: torch.Tensor | None = None, *, ignore_index: int,
    vocab_start: int = 0, z_scale: float = 1.0, first: bool = True, last: bool = True, softcap: float | None = None,
) -> None:
    """Launch the forward kernel on ``logits`` ``[rows, n_cols]`` (columns contiguous); see the module
    docstring. Writes ``lse`` and ``loss`` (fp32 ``[rows]``) for every row when ``last``. A vocabulary split into
    chunks is passed chunk by chunk with the same ``lse``, ``loss`` and a ``[rows]`` fp32 scratch ``target``:
    until the last chunk they carry the running max, sum and label logit."""
    running = None if first and last else (lse, loss, target, None)
    forward_rows(logits, labels, loss, lse, ignore_index=ignore_index, nll=True, z_scale=z_scale,
                 vocab_start=vocab_start, first=first, last=last, running=running, softcap=softcap)


def ce_backward_rows(
    logits: torch.Tensor, dlogits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    grad: torch.Tensor, *, ignore_index: int, grad_scale: float = 1.0,
    vocab_start: int = 0, z_scale: float = 1.0, softcap: float | None = None,
) -> None:
    """Launch the backward kernel: ``dlogits = (softmax - onehot) * grad * grad_scale * z_scale``
    (times the cap's slope with a ``softcap``; zero on ignored rows). ``grad`` is fp32, either 0-d (same for every
    row) or ``[rows]`` (any stride). ``dlogits`` may be ``logits`` itself."""
    backward_rows(logits, dlogits, labels, lse, grad, ignore_index=ignore_index, nll=True, grad_scale=grad_scale,
                  z_scale=z_scale, vocab_start=vocab_start, softcap=softcap)


def check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_softcap(softcap) -> float | None:
    """``softcap`` as a float (None stays None), or a ValueError."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    return float(softcap)


def reduce_loss(loss_rows: torch.Tensor, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid.clamp(min=1) if reduction == "mean" else total


def grad_scale_for(reduction: str, n_valid: torch.Tensor) -> torch.Tensor | float:
    """The factor of the incoming gradient: ``1 / n_valid`` for "mean" (a 0-d tensor, never read on the host)."""
    return 1.0 / n_valid.clamp(min=1) if reduction == "mean" else 1.0


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, reduction: str, n_valid: torch.Tensor, softcap):
        n_rows = logits.shape[0]
        lse = empty((n_rows,), dtype=torch.float32, device=logits.device)
        loss_rows = empty((n_rows,), dtype=torch.float32, device=logits.device)
        ce_forward_rows(logits, labels, lse, loss_rows, ignore_index=ignore_index, softcap=softcap)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.reduction, ctx.n_valid, ctx.softcap = ignore_index, reduction, n_valid, softcap
        return reduce_loss(loss_rows, reduction, n_valid)

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, lse = ctx.saved_tensors
        dlogits = empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # 1 / n_valid joins grad_output on the device (as a kernel argument it would be read on the host)
        grad = grad_output.float() * grad_scale_for(ctx.reduction, ctx.n_valid)
        ce_backward_rows(logits, dlogits, labels, lse, grad, ignore_index=ctx.ignore_index, softcap=ctx.softcap)
        return dlogits, None, None, None, None, None


def _cross_entropy_torch(logits, labels, ignore_index: int, reduction: str, n_valid: torch.Tensor,
                         softcap: float | None) -> torch.Tensor:
    log_probs = rows_torch(transform_torch(logits.float(), softcap=softcap), labels, ignore_index)[0]
    return reduce_loss(0.0 - log_probs, reduction, n_valid)  # 0 - x: +0, not -0, on ignored rows


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``labels``, as ``torch.nn.functional.cross_entropy`` but with
    fp32 math for any logits dtype and a mean that is 0 (not NaN) when every label is ignored.

    Args:
        logits: ``[N, V]`` fp32/fp16/bf16; columns contiguous (any row stride). V may be any size
            (128k-152k vocabularies are the intended case): the kernel walks each row in chunks.
        labels: ``[N]`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``; anything else
            raises ValueError on CPU; on a GPU it fails a device-side assert, without a host sync (see
            ``vocab_rows.check_labels``).
        ignore_index: label value whose rows contribute 0 loss and get a zero gradient.
        reduction: ``"mean"`` (sum / number of non-ignored labels), ``"sum"``, or ``"none"``.
        softcap: None, or ``c > 0``: the loss of ``c * tanh(logits / c)`` (Gemma 2's ``final_logit_softcapping``),
            capped in fp32 inside the kernel; the gradient includes the cap's slope ``1 - tanh^2``.

    Returns:
        fp32: a scalar for mean/sum, ``[N]`` for none (0 at ignored rows).

    -inf logits (masked vocabulary entries) have probability 0 and get a zero gradient (a label on one has
    loss +inf). A non-ignored row whose logits are ALL -inf has loss +inf and a zero gradient.

    Forward: ``lse_i = logsumexp_j x_ij`` (online over vocabulary chunks, saved in fp32),
    ``loss_i = lse_i - x_{i,y_i}``, then the reduction.
    Backward: ``dx_ij = (exp(x_ij - lse_i) - [j == y_i]) * g_i`` with ``g_i = grad_output`` (sum),
    ``grad_output / n_valid`` (mean) or ``grad_output[i]`` (none); 0 on ignored rows; in logits' dtype.
    """
    check_tensor("logits", logits, ndim=2)
    check_reduction(reduction)
    softcap = check_softcap(softcap)
    if isinstance(labels, torch.Tensor):
        check_same_device(logits=logits, labels=labels)
    n_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column (V >= 1)")
    n_valid = check_labels(labels, n_rows, vocab, ignore_index, rows_name="logits")
    if not use_triton(logits, "cross_entropy"):
        return _cross_entropy_torch(logits, labels, ignore_index, reduction, n_valid, softcap)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyFunction.apply(logits, labels.contiguous(), ignore_index, reduction, n_valid, softcap)

"""Cross-entropy over a large vocabulary: Triton forward (online log-sum-exp) and Triton backward.

Forward, per row ``x`` of ``V`` logits with label ``y`` (fp32 math whatever the logits' dtype)::

    lse  = log(sum_j exp(x_j))            # one pass over the row in BLOCK_V chunks, online:
                                          #   m' = max(m, max(chunk)); s' = s*exp(m-m') + sum(exp(chunk-m'))
    loss = lse - x_y                      # 0 where y == ignore_index; lse saved per row (fp32)

    reduction "none": loss per row [N];  "sum": sum(loss);  "mean": sum(loss) / n_valid
    (n_valid = number of labels != ignore_index; when it is 0 the mean is 0, not NaN)

    -inf logits (a masked vocabulary) get probability 0. A row with NO finite logit has no distribution:
    its lse is -inf, its loss +inf and its gradient 0 (both engines).

Backward, with ``g`` the incoming gradient (a scalar for mean/sum, per row for none)::

    dx_j = (softmax(x)_j - [j == y]) * g * scale      # scale = 1/n_valid for mean, else 1
    dx   = 0 on ignored rows;  written in the logits' dtype

The two kernels here are also the row math of the fused ops (``fused_linear_cross_entropy``,
``linear_log_probs``). For them the kernels take a few more knobs, all no-ops for plain
cross-entropy:

* ``z_scale``: the kernels work on ``z = x * z_scale`` (temperature / logit scale) and the
  backward returns ``dz/dx``-scaled gradients;
* ``vocab_start`` with ``FIRST``/``LAST``: the logits may be one *vocabulary chunk*
  ``[vocab_start, vocab_start + n_cols)`` of the row. The forward then folds the chunk into a running
  ``lse`` (kept in the ``lse`` buffer, combined with ``logaddexp``) and remembers the label's logit in
  a ``target`` buffer; the last chunk writes the loss. The backward only needs the final ``lse``, so
  every chunk's gradient is independent.
* ``dlogits`` may alias ``logits`` (in-place gradient, as the fused ops do) or be another buffer of
  another dtype (fp32 logits in, bf16 gradient out, ready for a bf16 GEMM).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_same_device, check_tensor, empty, on_gpu, use_triton

_REDUCTIONS = ("mean", "sum", "none")
_LABEL_DTYPES = (torch.int64, torch.int32)

# Columns per loop step of the forward and per program of the backward. 4096 fp32 values over
# 8 warps is 16 per thread: enough bytes in flight to saturate HBM, few enough registers to keep
# occupancy (the same order as flash-attention's and Liger's CE kernels).
_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _ce_fwd_kernel(
    LOGITS, LABELS, LSE, TARGET, LOSS,  # pointers: [rows, n_cols] logits; [rows] labels, fp32 lse / target / loss
    stride_logits_row,  # columns are contiguous
    n_cols, vocab_start,  # this call sees vocabulary entries [vocab_start, vocab_start + n_cols)
    z_scale, ignore_index,
    FIRST: tl.constexpr,  # first vocabulary chunk: no running lse to combine with
    LAST: tl.constexpr,  # last vocabulary chunk: write loss = lse - z_label
    CHUNKED: tl.constexpr,  # not (FIRST and LAST): the label's logit goes through the TARGET buffer
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 for [N, 152k] logits
    label = tl.load(LABELS + row).to(tl.int64)
    if label != ignore_index:
        row_ptr = LOGITS + row * stride_logits_row
        # Online log-sum-exp: never assume the row fits one block (V is 128k-152k for Llama-3/Qwen2).
        m = -float("inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * z_scale
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every logit so far is -inf (a masked prefix), exponentiate against 0, not m_new:
            # the sums stay 0 instead of exp(-inf - -inf) = NaN.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(s)  # -inf when the row has no finite logit (m = -inf, s = 0)
        if not FIRST:
            # fold this chunk into the lse of the chunks before it: logaddexp(previous, lse), either may be -inf
            prev = tl.load(LSE + row)
            hi = tl.maximum(prev, lse)
            hi = tl.where(hi == -float("inf"), 0.0, hi)
            lse = hi + tl.log(tl.exp(prev - hi) + tl.exp(lse - hi))
        tl.store(LSE + row, lse)

        # The label's logit: one scalar load, from whichever chunk holds it.
        local = label - vocab_start
        in_chunk = (local >= 0) & (local < n_cols)
        target = tl.load(row_ptr + local, mask=in_chunk, other=0.0).to(tl.float32) * z_scale
        if CHUNKED:
            if not FIRST:
                target = tl.where(in_chunk, target, tl.load(TARGET + row))
            tl.store(TARGET + row, target)
        if LAST:
            # no finite logit: loss +inf (lse - target would be -inf - -inf = NaN)
            tl.store(LOSS + row, tl.where(lse == -float("inf"), float("inf"), lse - target))
    else:
        # Ignored row: skip reading its logits at all (prompt tokens are often most of a batch).
        tl.store(LSE + row, 0.0)
        if LAST:
            tl.store(LOSS + row, 0.0)


@triton.jit
def _ce_bwd_kernel(
    LOGITS, DLOGITS, LABELS, LSE, GRAD,  # pointers; DLOGITS may alias LOGITS; GRAD is fp32
    stride_logits_row, stride_dlogits_row, stride_grad,  # stride_grad = 0 for a scalar grad_output
    n_cols, vocab_start,
    z_scale, grad_scale, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # One program per (row, column block): the gradient of a block needs only the row's saved lse,
    # so the backward is a single embarrassingly parallel pass.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    label = tl.load(LABELS + row).to(tl.int64)
    lse = tl.load(LSE + row)
    valid = (label != ignore_index) & (lse != -float("inf"))  # a row with no finite logit gets a zero gradient
    g = tl.load(GRAD + row * stride_grad) * grad_scale

    # Ignored rows read nothing (an empty load mask) and write zeros.
    load_mask = cols < tl.where(valid, n_cols, 0)
    z = tl.load(LOGITS + row * stride_logits_row + cols, mask=load_mask, other=0.0).to(tl.float32) * z_scale
    p = tl.exp(z - lse)
    is_label = (cols + vocab_start) == label
    dz = (p - tl.where(is_label, 1.0, 0.0)) * g
    dz = tl.where(valid, dz, 0.0)  # not dz * 0: a NaN/inf grad_output on an ignored row stays out
    tl.store(DLOGITS + row * stride_dlogits_row + cols, (dz * z_scale).to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return max(16, min(_BLOCK_V, triton.next_power_of_2(n_cols)))


def ce_forward_rows(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, loss: torch.Tensor,
    target: torch.Tensor | None = None, *, ignore_index: int,
    vocab_start: int = 0, z_scale: float = 1.0, first: bool = True, last: bool = True,
) -> None:
    """Launch the forward kernel on ``logits`` ``[rows, n_cols]`` (columns contiguous); see the module
    docstring. Writes ``lse`` (and, when ``last``, ``loss``) for every row; ``target`` is a [rows]
    fp32 scratch buffer needed only when the vocabulary is split into several chunks."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = _block_v(n_cols)
    _ce_fwd_kernel[(n_rows,)](
        logits, labels, lse, target if target is not None else lse, loss if last else lse,
        logits.stride(0),
        n_cols, vocab_start,
        float(z_scale), ignore_index,
        FIRST=first, LAST=last, CHUNKED=not (first and last), BLOCK_V=block_v,
        num_warps=_NUM_WARPS if block_v >= 2048 else 4,
    )


def ce_backward_rows(
    logits: torch.Tensor, dlogits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    grad: torch.Tensor, *, ignore_index: int, grad_scale: float = 1.0,
    vocab_start: int = 0, z_scale: float = 1.0,
) -> None:
    """Launch the backward kernel: ``dlogits = (softmax - onehot) * grad * grad_scale * z_scale``
    (zero on ignored rows). ``grad`` is fp32, either 0-d (same for every row) or ``[rows]`` (any
    stride). ``dlogits`` may be ``logits`` itself."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    # A 0-d grad is shared by every row (mean/sum); a 1-d one has a value per row (none).
    stride_grad = grad.stride(0) if grad.dim() == 1 else 0
    block_v = _block_v(n_cols)
    _ce_bwd_kernel[(n_rows, triton.cdiv(n_cols, block_v))](
        logits, dlogits, labels, lse, grad,
        logits.stride(0), dlogits.stride(0), stride_grad,
        n_cols, vocab_start,
        float(z_scale), float(grad_scale), ignore_index,
        BLOCK_V=block_v, num_warps=_NUM_WARPS if block_v >= 2048 else 4,
    )


def check_labels(labels, n_rows: int, vocab: int, ignore_index: int, *, rows_name: str) -> torch.Tensor:
    """Validate ``labels`` ([n_rows] int64/int32, each in [0, vocab) or == ignore_index) and return the
    number of non-ignored labels as a 0-d int64 tensor on labels' device.

    Nothing is read back to the host on a GPU (no sync: the loss is queued right behind the forward). There an
    out-of-range label, which the kernels would read out of bounds, fails a device-side assert
    (``torch._assert_async``): the error surfaces at the next sync as "device-side assert triggered"; rerun
    on CPU (or with ``CUDA_LAUNCH_BLOCKING=1``) to see it at its source. On CPU the check is immediate: a
    ValueError naming the first bad label."""
    check_tensor("labels", labels, dtypes=_LABEL_DTYPES, ndim=1)
    if labels.shape[0] != n_rows:
        raise ValueError(f"labels has {labels.shape[0]} elements but {rows_name} has {n_rows} rows")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if on_gpu(labels):
        torch._assert_async(~bad.any(), f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    elif bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; {int(bad.sum())} are not, "
            f"the first at index {first} is {int(labels[first])}"
        )
    return valid.sum()


def check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


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
    def forward(ctx, logits, labels, ignore_index: int, reduction: str, n_valid: torch.Tensor):
        n_rows = logits.shape[0]
        lse = empty((n_rows,), dtype=torch.float32, device=logits.device)
        loss_rows = empty((n_rows,), dtype=torch.float32, device=logits.device)
        ce_forward_rows(logits, labels, lse, loss_rows, ignore_index=ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.reduction, ctx.n_valid = ignore_index, reduction, n_valid
        return reduce_loss(loss_rows, reduction, n_valid)

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, lse = ctx.saved_tensors
        dlogits = empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # 1 / n_valid joins grad_output on the device (as a kernel argument it would be read on the host)
        grad = grad_output.float() * grad_scale_for(ctx.reduction, ctx.n_valid)
        ce_backward_rows(logits, dlogits, labels, lse, grad, ignore_index=ctx.ignore_index)
        return dlogits, None, None, None, None


def without_dead_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the PyTorch engines: ``(z with every row of only -inf logits zeroed, mask of those rows)``.
    Autograd through ``logsumexp`` / ``log_softmax`` of such a row is NaN even where the result is
    replaced afterwards (NaN * 0); zeroed, the row's gradient is exactly 0, as in the kernels."""
    with torch.no_grad():
        dead = z.amax(dim=-1) == float("-inf")
    return torch.where(dead.unsqueeze(-1), 0.0, z), dead


def ce_loss_rows_torch(z: torch.Tensor, labels, ignore_index: int) -> torch.Tensor:
    """Per-row loss of fp32 logits ``z`` with the kernels' conventions (0 on ignored rows, +inf on rows with
    no finite logit), by plain autograd."""
    z, dead = without_dead_rows(z)
    valid = labels != ignore_index
    target = z.gather(1, torch.where(valid, labels, 0).long().unsqueeze(1)).squeeze(1)
    loss = torch.where(dead, float("inf"), torch.logsumexp(z, dim=-1) - target)
    return torch.where(valid, loss, 0.0)


def _cross_entropy_torch(logits, labels, ignore_index: int, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    return reduce_loss(ce_loss_rows_torch(logits.float(), labels, ignore_index), reduction, n_valid)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``labels``, as ``torch.nn.functional.cross_entropy`` but with
    fp32 math for any logits dtype and a mean that is 0 (not NaN) when every label is ignored.

    Args:
        logits: ``[N, V]`` fp32/fp16/bf16; columns contiguous (any row stride). V may be any size
            (128k-152k vocabularies are the intended case): the kernel walks each row in chunks.
        labels: ``[N]`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``; anything else
            raises ValueError on CPU; on a GPU it fails a device-side assert, without a host sync (see
            ``check_labels``).
        ignore_index: label value whose rows contribute 0 loss and get a zero gradient.
        reduction: ``"mean"`` (sum / number of non-ignored labels), ``"sum"``, or ``"none"``.

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
    if isinstance(labels, torch.Tensor):
        check_same_device(logits=logits, labels=labels)
    n_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column (V >= 1)")
    n_valid = check_labels(labels, n_rows, vocab, ignore_index, rows_name="logits")
    if not use_triton(logits):
        return _cross_entropy_torch(logits, labels, ignore_index, reduction, n_valid)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyFunction.apply(logits, labels.contiguous(), ignore_index, reduction, n_valid)

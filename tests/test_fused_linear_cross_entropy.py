"""fused_linear_cross_entropy: Triton (interpreted) and PyTorch paths against float64 autograd of
cross_entropy(hidden @ weight.T, labels)."""
import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close

from fastft.kernels._common import use_engine
from fastft.kernels.fused_linear_cross_entropy import _default_chunk_rows, fused_linear_cross_entropy

ENGINES = ["triton", "torch"]
REDUCTIONS = ["mean", "sum", "none"]
N, H, V = 23, 48, 32003  # 23 tokens in chunks of 16 (the last one partial); V not a block multiple

# Tolerances (reference: float64 math on the same, already rounded, inputs).
# - loss: the logits GEMM accumulates in fp32 and all softmax math is fp32 in every dtype: ~1e-6
#   relative on values of ~10 (sums of ~25 of them).
# - grads, fp32: dhidden is an fp32 sum of V = 32k products: rounding grows like sqrt(V) * 2**-24 ~ 1e-5
#   of the summed magnitudes, so 1e-5 relative plus 1e-5 of the largest gradient (elements that are small
#   through cancellation of the -W[label] and sum_j p_j W_j terms keep the large terms' absolute error).
# - grads, bf16/fp16: dlogits is rounded once to the compute dtype (bf16 under the interpreter truncates:
#   < 2**-7), the GEMM result is rounded once (2**-8) and so is the scaling by grad_output (2**-8): 2**-6
#   relative; elements that are small through cancellation carry the absolute error of the large terms,
#   2**-7 of the largest gradient. fp16 has 3 more mantissa bits.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-7), torch.float16: (2**-9, 2**-10)}
LOSS_TOL = dict(atol=2e-6, rtol=2e-6)


def _inputs(dtype, seed=0, n=N, ignore_share=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_share] = -100
    labels[0] = V - 1
    return hidden, weight, labels


def _reference(hidden, weight, labels, reduction, grad_output):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction=reduction)
    loss.backward(grad_output.double())
    return loss.detach(), h.grad, w.grad


def _check_grad(actual, expected, dtype, name):
    rtol, atol_rel = GRAD_TOL[dtype]
    assert actual.dtype == dtype, f"{name} dtype {actual.dtype}"
    assert_close(actual, expected, atol=atol_rel * expected.abs().max().item(), rtol=rtol, name=name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64_reference(engine, dtype, reduction):
    hidden, weight, labels = _inputs(dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=16)
    assert loss.dtype == torch.float32
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
    loss.backward(grad_output)
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, reduction, grad_output)
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, dtype, "dhidden")
    _check_grad(w.grad, ref_dw, dtype, "dweight")
    assert (h.grad[labels == -100] == 0).all()


def test_fp16_and_default_chunk_size():
    hidden, weight, labels = _inputs(torch.float16, seed=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels)  # default chunking: one chunk of 23 rows here
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, "mean", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, torch.float16, "dhidden")
    _check_grad(w.grad, ref_dw, torch.float16, "dweight")


def test_default_chunk_rows():
    assert _default_chunk_rows(37, H, V) == 37  # short inputs: one chunk
    assert _default_chunk_rows(16384, 4096, 128256) == 512  # Llama-3-8B: 512 x 128k fp32 = 256 MB per chunk
    assert _default_chunk_rows(0, H, V) == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_frozen_weight_or_hidden(engine, reduction, trainable):
    hidden, weight, labels = _inputs(torch.float32, seed=3, n=13)
    h = hidden.clone().requires_grad_(trainable == "hidden")
    w = weight.clone().requires_grad_(trainable == "weight")
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=5)
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(4))
    loss.backward(grad_output)
    _, ref_dh, ref_dw = _reference(hidden, weight, labels, reduction, grad_output)
    if trainable == "hidden":
        assert w.grad is None
        _check_grad(h.grad, ref_dh, torch.float32, "dhidden")
    else:
        assert h.grad is None
        _check_grad(w.grad, ref_dw, torch.float32, "dweight")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_labels_ignored(engine, reduction):
    hidden, weight, _ = _inputs(torch.float32, seed=5, n=7)
    labels = torch.full((7,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=4)
    loss.backward(torch.ones_like(loss))
    assert torch.isfinite(loss).all() and (loss == 0).all()
    for grad in (h.grad, w.grad):
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_mixed_dtypes_and_no_grad():
    # bf16 hidden states with an fp32 head (peft's prepare_model_for_kbit_training upcasts lm_head):
    # the GEMMs run in fp32, each gradient comes back in its input's dtype.
    hidden, weight, labels = _inputs(torch.float32, seed=6, n=11)
    hidden = hidden.bfloat16()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_size=8)
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, "sum", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, torch.bfloat16, "dhidden")  # fp32 math, one rounding to bf16
    _check_grad(w.grad, ref_dw, torch.float32, "dweight")
    with torch.no_grad():
        again = fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_size=8)
    assert not again.requires_grad
    assert_close(again, ref_loss, **LOSS_TOL, name="loss under no_grad")


@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_range_labels_raise(engine):
    hidden, weight, labels = _inputs(torch.float32, n=5)
    labels[3] = V
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*\[0, 32003\).*index 3 is 32003"):
        fused_linear_cross_entropy(hidden, weight, labels)
    labels[3] = -1
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*index 3 is -1"):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_bad_arguments_raise_clear_errors():
    hidden, weight, labels = _inputs(torch.float32, n=5)
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        fused_linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels has 4 elements"):
        fused_linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_cross_entropy(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch(engine):
    h, w = torch.randn(0, H, requires_grad=True), torch.randn(10, H, requires_grad=True)
    with use_engine(engine):
        losses = [fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), reduction=r) for r in REDUCTIONS]
    assert [loss.shape for loss in losses] == [(), (), (0,)] and losses[0] == 0 and losses[1] == 0
    sum(loss.sum() for loss in losses).backward()
    assert h.grad.shape == (0, H) and (w.grad == 0).all()


def _masked_head(dtype, masked_columns):
    """Inputs whose logits are -inf on `masked_columns` of the vocabulary: the last hidden feature is 1 on every
    row and the last weight column -inf there (0 elsewhere), so those logits are finite + (-inf)."""
    hidden, weight, labels = _inputs(dtype, seed=3)
    hidden[:, -1] = 1.0
    weight[:, -1] = 0.0
    weight[masked_columns, -1] = float("-inf")
    return hidden, weight, labels


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_vocabulary(engine, dtype, reduction):
    """A masked prefix (the whole first 4096-column block) and a masked middle; labels avoid them. hidden is
    frozen here: its gradient dz @ W would multiply the masked logits' zero gradient by the -inf weights."""
    masked = torch.zeros(V, dtype=torch.bool)
    masked[:4100], masked[10000:20000] = True, True
    hidden, weight, labels = _masked_head(dtype, masked)
    labels[(labels >= 0) & masked[labels.clamp(min=0)]] = 5000
    w = weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(hidden, w, labels, reduction=reduction, chunk_size=16)
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(grad_output)

    hd, wd = hidden.double(), weight.double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, labels, ignore_index=-100, reduction=reduction)
    ref.backward(grad_output.double())
    assert_close(loss, ref.detach(), **LOSS_TOL, name="loss")
    assert torch.isfinite(w.grad).all() and (w.grad[masked] == 0).all()
    _check_grad(w.grad, wd.grad, dtype, "dweight")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_logit_masked(engine):
    """No finite logit in a row: loss +inf (mean: +inf), zero gradient; ignored rows stay 0."""
    hidden, weight, labels = _masked_head(torch.float32, slice(None))
    w = weight.clone().requires_grad_()
    with use_engine(engine):
        rows = fused_linear_cross_entropy(hidden, w, labels, reduction="none", chunk_size=16)
        mean = fused_linear_cross_entropy(hidden, w, labels, reduction="mean", chunk_size=16)
    valid = labels != -100
    assert (rows[valid] == float("inf")).all() and (rows[~valid] == 0).all() and mean == float("inf")
    (rows.sum() + mean).backward()
    assert (w.grad == 0).all()

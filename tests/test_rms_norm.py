"""fastft.kernels.rms_norm against float64 math and Hugging Face's LlamaRMSNorm."""
import pytest
import torch
from kernel_testing import BF16, ENGINES, EPS, F16, F32, assert_close
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastft.doctor.references import rms_norm_reference
from fastft.kernels import use_engine
from fastft.kernels._common import INTERPRET
from fastft.kernels.rms_norm import rms_norm


def _inputs(shape, x_dtype, w_dtype, seed=0, w_grad=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(x_dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(w_dtype).requires_grad_(w_grad)
    return x, w


def _check_against_float64(x, w, y, dy, eps, engine="triton"):
    y_ref, dx_ref, dw_ref, xhat_ref = rms_norm_reference(x, w, dy, eps)
    out_dtype = torch.promote_types(x.dtype, w.dtype)
    assert y.dtype == out_dtype
    # y rounds twice: xhat to x.dtype, then the product to the output dtype. Half an ulp each with
    # round-to-nearest; the interpreter truncates fp32->bf16 (up to 1 ulp), so allow 1 ulp for each
    # step. fp32: the fp32 sum of H squares in rstd dominates (~1e-6 relative).
    rtol = max(EPS[x.dtype] + EPS[out_dtype], 1e-5)
    assert_close(y, y_ref, atol=1e-6, rtol=rtol, name="y")
    # dx: fp32 math then one rounding to x.dtype (1 ulp covers interpreter truncation); atol for the
    # fp32 cancellation in g - xhat * mean(g * xhat).
    atol = 1e-5 * dx_ref.abs().max().item()
    if engine == "torch":
        # The PyTorch path is HF's formula under autograd: the gradient g = dy * w is rounded to
        # x.dtype at the cast's backward, before the cancellation: up to eps * rstd * |g| absolute.
        rstd = torch.rsqrt(x.detach().double().pow(2).mean(-1) + eps).max().item()
        atol += EPS[x.dtype] * rstd * (dy.double() * w.detach().double()).abs().max().item()
    assert_close(x.grad, dx_ref, atol=atol, rtol=max(EPS[x.dtype], 1e-5), name="dx")
    if w.requires_grad:
        # each term dy * cast(xhat) is off by <= 1 ulp of x.dtype relative to the exact dy * xhat, and
        # the rows cancel: bound by eps * sum_rows |dy * xhat|; then one rounding to w.dtype.
        rows = dy.double().reshape(-1, dy.shape[-1]) * xhat_ref.reshape(-1, dy.shape[-1])
        bound = rows.abs().sum(0).max().item()
        atol = max(EPS[x.dtype], 1e-5) * bound
        assert_close(w.grad, dw_ref, atol=atol, rtol=max(EPS[w.dtype], 1e-6), name="dweight")
    else:
        assert w.grad is None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F16), (F16, F32)])
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 1000), (2, 3, 576)])
def test_matches_float64(shape, x_dtype, w_dtype, engine):
    x, w = _inputs(shape, x_dtype, w_dtype)
    eps = 1e-5
    with use_engine(engine):
        y = rms_norm(x, w, eps)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        y.backward(dy)
    _check_against_float64(x, w, y, dy, eps, engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(BF16, F32), (BF16, BF16), (F16, F32), (F16, F16)])
def test_matches_llama_rmsnorm_module(x_dtype, w_dtype, engine):
    shape = (3, 7, 1000)
    x, w = _inputs(shape, x_dtype, w_dtype, seed=2)
    module = LlamaRMSNorm(shape[-1], eps=1e-6).to(w_dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    expected = module(x.detach())
    with use_engine(engine):
        y = rms_norm(x.detach(), w.detach(), eps=module.variance_epsilon)
    assert y.dtype == expected.dtype
    # Same casts in the same order, so the results agree bit for bit except where the fp32 sum of
    # squares rounds differently from PyTorch's and flips a rounding (1 ulp, rare).
    ulp = EPS[x_dtype] if y.dtype == F32 else EPS[y.dtype]
    if x_dtype == BF16 and INTERPRET and engine == "triton":
        # bf16 only: the interpreter truncates the fp32->bf16 casts of xhat and (bf16 weight) of
        # y: up to 1 ulp each, and about half the elements differ, so no bit-equality check.
        assert_close(y, expected, atol=0, rtol=2 * ulp, name="y vs LlamaRMSNorm")
    else:
        assert_close(y, expected, atol=0, rtol=ulp, name="y vs LlamaRMSNorm")
        # Without the cast of xhat to x.dtype before the weight (or with a second rounding), a
        # large fraction of the elements would differ; a few rare flips are allowed.
        same = (y == expected).double().mean().item()
        assert same > 0.99, f"only {same:.2%} of elements equal LlamaRMSNorm's"


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_weight_and_no_input_grad(engine):
    x, w = _inputs((4, 5, 96), BF16, F32, seed=3, w_grad=False)
    with use_engine(engine):
        y = rms_norm(x, w)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype)
        y.backward(dy)
    _check_against_float64(x, w, y, dy, 1e-6, engine)

    # the other way round: only the weight is trained
    x, w = _inputs((9, 40), F16, F32, seed=5)
    x = x.detach()
    with use_engine(engine):
        y = rms_norm(x, w)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(y.dtype)
        y.backward(dy)
    y_ref, _, dw_ref, xhat = rms_norm_reference(x, w, dy, 1e-6)
    assert_close(y, y_ref, atol=1e-6, rtol=2 * EPS[F16], name="y")
    bound = (dy.double() * xhat).abs().sum(0).max().item()
    assert_close(w.grad, dw_ref, atol=EPS[F16] * bound, rtol=1e-6, name="dweight")


@pytest.mark.parametrize("engine", ENGINES)
def test_strided_inputs(engine):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3, 10, 130, generator=gen)
    cases = {
        # leading dims flatten to one row stride (130 != H): read in place
        "row stride > H": base[:, :, :123],
        # leading dims that do not flatten to one stride: copied
        "every other row": base[:, ::2, :],
        # last dim not contiguous: copied
        "transposed": base.transpose(0, 2)[:, :, :7].transpose(1, 2),
    }
    for name, view in cases.items():
        x = view.detach().requires_grad_()  # detach keeps the strides
        assert not x.is_contiguous(), name
        w = (1 + 0.5 * torch.randn(x.shape[-1], generator=gen)).requires_grad_()
        with use_engine(engine):
            y = rms_norm(x, w)
            dy = torch.randn(y.shape, generator=gen)
            y.backward(dy)
        _check_against_float64(x, w, y, dy, 1e-6, engine)


def test_output_can_be_modified_in_place():
    # like HF's module output, the result is a plain tensor (not a view): in-place ops work
    x, w = _inputs((2, 3, 10), F32, F32, seed=8)
    y = rms_norm(x, w)
    y.mul_(3)
    y.sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (3 * w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).sum().backward()
    assert_close(x.grad, x64.grad, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(w.grad, w64.grad, atol=1e-5, rtol=1e-5, name="dweight")


def test_zero_rows():
    x = torch.randn(0, 3, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(16))


def test_bad_inputs():
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm(x.tolist(), w)
    with pytest.raises(TypeError, match="weight has dtype int64"):
        rms_norm(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight has dtype float64"):
        rms_norm(x, torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        rms_norm(x, torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"weight has 7 elements but x's last dim \(H\) is 8"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="x must have at least 1 dimensions"):
        rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, eps=torch.tensor(1e-6))
    with pytest.raises(ValueError, match="x on cpu, weight on meta"):
        rms_norm(x, torch.ones(8, device="meta"))

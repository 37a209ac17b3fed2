"""fastft.kernels.swiglu against float64 math."""
import pytest
import torch
from kernel_testing import BF16, ENGINES, EPS, F16, F32, assert_close

from fastft.doctor.references import swiglu_reference
from fastft.kernels import use_engine
from fastft.kernels.swiglu import swiglu, swiglu_backward_into, swiglu_forward_into


def _run_and_check(gate, up, engine, seed):
    with use_engine(engine):
        out = swiglu(gate, up)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(grad_out)
    ref, ref_dgate, ref_dup = swiglu_reference(gate, up, grad_out)
    assert out.dtype == gate.dtype and out.shape == gate.shape
    # Everything is computed in fp32 from the exact inputs and rounded once to the dtype: 1 ulp
    # relative covers round-to-nearest and the interpreter's truncating bf16 casts. fp32: a few ulps
    # from sigmoid/exp; atol for values near the zeros of silu and silu' (gate = 0, gate ~ -1.28).
    rtol = max(EPS[gate.dtype], 1e-5)
    scale = (gate.double().abs().max() * up.double().abs().max() * grad_out.double().abs().max()).item()
    assert_close(out, ref, atol=1e-6 * scale, rtol=rtol, name="out")
    assert_close(gate.grad, ref_dgate, atol=1e-6 * scale, rtol=rtol, name="d_gate")
    assert_close(up.grad, ref_dup, atol=1e-6 * scale, rtol=rtol, name="d_up")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 1000), (1,)])
def test_matches_float64(shape, dtype, engine):
    gen = torch.Generator().manual_seed(len(shape))
    # spread of +-12 reaches sigmoid's flat tails and silu's minimum near -1.28
    gate = (4 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    _run_and_check(gate, up, engine, seed=3)


@pytest.mark.parametrize("engine", ENGINES)
def test_views_of_a_fused_gate_up_projection(engine):
    # gate/up sliced out of one [N, 2I] projection are not contiguous: they are copied once
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(9, 2 * 37, generator=gen).to(BF16)
    gate = gate_up[:, :37].detach().requires_grad_()
    up = gate_up[:, 37:].detach().requires_grad_()
    assert not gate.is_contiguous()
    _run_and_check(gate, up, engine, seed=5)


def test_empty():
    gate = torch.randn(0, 8, requires_grad=True)
    up = torch.randn(0, 8, requires_grad=True)
    out = swiglu(gate, up)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert gate.grad.shape == (0, 8) and up.grad.shape == (0, 8)


def test_bad_inputs():
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"up has shape \(4, 5\) but gate has shape \(4, 6\)"):
        swiglu(gate, up[:, :5])
    with pytest.raises(TypeError, match="up has dtype torch.bfloat16 but gate has dtype torch.float32"):
        swiglu(gate, up.bfloat16())
    with pytest.raises(TypeError, match="gate has dtype int32"):
        swiglu(gate.int(), up.int())
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        swiglu(gate, 1.0)
    with pytest.raises(ValueError, match="gate on cpu, up on meta"):
        swiglu(gate, up.to("meta"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_backward_into_its_inputs_with_the_activation(engine, dtype):
    """The fused MLP's one pass: reads g_out, gate, up; writes the activation over g_out, d_gate over gate and
    d_up over up (every output aliases an input)."""
    gen = torch.Generator().manual_seed(6)
    gate = (4 * torch.randn(7, 333, generator=gen)).to(dtype)
    up = torch.randn(7, 333, generator=gen).to(dtype)
    grad_out = torch.randn(7, 333, generator=gen).to(dtype)
    ref_out, ref_dgate, ref_dup = swiglu_reference(gate, up, grad_out)
    scale = (gate.double().abs().max() * up.double().abs().max() * grad_out.double().abs().max()).item()
    with use_engine(engine):
        swiglu_backward_into(grad_out, gate, up, gate, up, out=grad_out)
    rtol = max(EPS[dtype], 1e-5)
    assert_close(grad_out, ref_out, atol=1e-6 * scale, rtol=rtol, name="out")
    assert_close(gate, ref_dgate, atol=1e-6 * scale, rtol=rtol, name="d_gate")
    assert_close(up, ref_dup, atol=1e-6 * scale, rtol=rtol, name="d_up")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_forward_into_a_callers_buffer(engine, dtype):
    """The public forward launcher writes every element of the caller's buffer (poisoned with NaN first) and
    returns it."""
    gen = torch.Generator().manual_seed(7)
    gate = (4 * torch.randn(5, 1111, generator=gen)).to(dtype)
    up = torch.randn(5, 1111, generator=gen).to(dtype)
    out = torch.full_like(gate, float("nan"))
    with use_engine(engine):
        assert swiglu_forward_into(gate, up, out) is out
    ref, _, _ = swiglu_reference(gate, up, torch.zeros_like(gate))
    scale = (gate.double().abs().max() * up.double().abs().max()).item()
    assert_close(out, ref, atol=1e-6 * scale, rtol=max(EPS[dtype], 1e-5), name="out")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_launchers_on_the_halves_of_a_fused_gate_up_output(engine, dtype):
    """The fused gate/up MLP (Phi-3's gate_up_proj): gate and up are the column halves of one [T, 2I] tensor (rows
    strided by 2I), read in place; the backward writes [d_gate | d_up] over them, the activation into a
    contiguous buffer; columns not a multiple of the block, rows of another stride for the output."""
    gen = torch.Generator().manual_seed(8)
    T, inter = 6, 1100
    gate_up = (4 * torch.randn(T, 2 * inter, generator=gen)).to(dtype)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    grad_out = torch.randn(T, inter, generator=gen).to(dtype)
    ref_out, ref_dgate, ref_dup = swiglu_reference(gate, up, grad_out)
    scale = (gate.double().abs().max() * up.double().abs().max() * grad_out.double().abs().max()).item()
    rtol = max(EPS[dtype], 1e-5)
    wide = torch.full((T, inter + 3), float("nan"), dtype=dtype)  # an output with strided rows, too
    with use_engine(engine):
        swiglu_forward_into(gate, up, wide[:, :inter])
        assert_close(wide[:, :inter], ref_out, atol=1e-6 * scale, rtol=rtol, name="out")
        assert wide[:, inter:].isnan().all()  # nothing written past the row
        out = torch.full((T, inter), float("nan"), dtype=dtype)
        swiglu_backward_into(grad_out, gate, up, gate, up, out=out)
    assert_close(out, ref_out, atol=1e-6 * scale, rtol=rtol, name="recomputed out")
    assert_close(gate_up[:, :inter], ref_dgate, atol=1e-6 * scale, rtol=rtol, name="d_gate")
    assert_close(gate_up[:, inter:], ref_dup, atol=1e-6 * scale, rtol=rtol, name="d_up")


def test_launchers_refuse_bad_buffers():
    gate, up, out = torch.randn(4, 6), torch.randn(4, 6), torch.empty(4, 6)
    with pytest.raises(ValueError, match=r"out is \(4, 5\) torch.float32 but gate is \(4, 6\)"):
        swiglu_forward_into(gate, up, out[:, :5].contiguous())
    with pytest.raises(ValueError, match=r"up is \(4, 6\) torch.float16 but gate"):
        swiglu_forward_into(gate, up.half(), out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        swiglu_forward_into(gate, up, torch.empty(6, 4).t())
    with pytest.raises(TypeError, match="grad_up must be a torch.Tensor"):
        swiglu_backward_into(out, gate, up, gate, None)
    with pytest.raises(ValueError, match="gate on cpu, up on meta"):
        swiglu_backward_into(out, gate, up.to("meta"), gate, up)

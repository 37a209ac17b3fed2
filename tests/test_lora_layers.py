"""Fused NF4/16-bit + LoRA layers (kernels/lora_linear.py, lora_qkv.py, lora_mlp.py, over the shared
lora_projection.py) against peft's own LoRA layers over bitsandbytes' NF4 ``Linear4bit`` (the oracle), and
fastft/quant.py's reading of peft layers (active adapter, refusals).

Tolerances:
* fp32: peft and the fused path do the same products, only grouped differently (the LoRA term is
  accumulated into the base output, the scaling applied to small [T, r] or [r, in] tensors): the
  differences are summation-order roundoff, ~1e-6 relative to the largest element. 1e-5 catches
  any missing term or wrong scaling (those are O(1)).
* bf16 / fp16: both sides round intermediates (base result, LoRA result, dy @ B, ...) to 16 bits at
  different points; each rounding is at most 2^-9 (bf16) of the value rounded, and a handful of
  them add up. We allow 2^-6 of the largest |expected| element, plus 2^-6 relative: a few bf16
  ulps, far below the O(1) error of any real bug (dropped LoRA term, wrong scale, W mis-read).
Peft layers run in training mode with gradients on, so bitsandbytes never repacks their weights
for CPU inference (see test_nf4.py for that path).
"""
import importlib

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from kernel_testing import ENGINES, assert_close
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
from tiny_models import FixedDropoutMask, bnb_cpu_reference_ok, drawn_dropout_masks
from torch.utils._python_dispatch import TorchDispatchMode

from fastft.doctor.references import lora_mlp_reference, lora_projection_reference, nf4_reference
from fastft.kernels._common import use_engine
from fastft.kernels.lora_linear import lora_linear
from fastft.kernels.lora_mlp import lora_mlp, lora_mlp_gate_up
from fastft.kernels.lora_qkv import lora_qkv
from fastft.kernels.nf4 import NF4Weight
from fastft.quant import UnsupportedLoraLayer, fused_linear_args, lora_args_of, nf4_weight_of

lora_projection = importlib.import_module("fastft.kernels.lora_projection")



def _tol(dtype, expected):
    if dtype == torch.float32:
        return dict(atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)
    return dict(atol=2 ** -6 * expected.abs().max().item(), rtol=2 ** -6)


def _nf4_base(in_f, out_f, *, bias=False, compute_dtype=None, seed=0):
    """A bitsandbytes NF4 Linear4bit (double-quantized scales), quantized on the CPU."""
    assert bnb_cpu_reference_ok(in_f), f"bitsandbytes' CPU path, the reference here, is wrong for in_features={in_f}"
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight.data = torch.randn(out_f, in_f) / in_f ** 0.5
    if bias:
        layer.bias.data = torch.randn(out_f) * 0.1
        layer.bias.requires_grad_(False)  # Qwen2's q/k/v bias is frozen under LoRA
    return layer.to("cpu")  # quantizes


def _dense_base(in_f, out_f, *, bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer.requires_grad_(False)
    return layer


def _lora(base, *, r=4, alpha=8, lora_dtype=torch.float32, seed=1, **config):
    """A peft LoRA layer over ``base`` with random NON-zero A and B (peft initialises B to 0)."""
    cls = LoraLinear4bit if isinstance(base, bnb.nn.Linear4bit) else LoraLinear
    layer = cls(base, "default", LoraConfig(r=r, lora_alpha=alpha, **config), r=r, lora_alpha=alpha)
    _randomize(layer, "default", lora_dtype, seed)
    return layer


def _randomize(layer, name, dtype, seed):
    torch.manual_seed(seed)
    layer.lora_A[name].to(dtype)
    layer.lora_B[name].to(dtype)
    with torch.no_grad():
        layer.lora_A[name].weight.normal_(0, 0.3)
        layer.lora_B[name].weight.normal_(0, 0.3)


def _trainable(layers):
    return [p for layer in layers for p in layer.parameters() if p.requires_grad]


def _run(fn, x, params, grads_out):
    """Outputs, dx and the gradients of ``params`` for ``fn(x)`` with output gradients ``grads_out``."""
    x = x.detach().requires_grad_(True)
    for p in params:
        p.grad = None
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs] + [x.grad] + [p.grad.clone() for p in params]


def _compare(fused_fn, peft_fn, x, params, dtype, names):
    with torch.no_grad():
        outs = peft_fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(123)
    grads_out = [torch.randn_like(o) for o in outs]
    expected = _run(peft_fn, x, params, grads_out)
    for engine in ENGINES:
        with use_engine(engine):
            actual = _run(fused_fn, x, params, grads_out)
        for name, a, e in zip(names, actual, expected):
            assert a.dtype == e.dtype, f"{engine} {name}: dtype {a.dtype} != peft's {e.dtype}"
            assert_close(a, e, name=f"{engine} {name} ({dtype})", **_tol(dtype, e))


# ---------------------------------------------------------------------------------------------
# lora_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_nf4_matches_peft(dtype):
    # in=72, out=200, r=4, 13 tokens (batch 1): odd sizes; blocks of 64 straddle rows of 72
    layer = _lora(_nf4_base(72, 200, compute_dtype=dtype), lora_dtype=dtype)
    x = torch.randn(1, 13, 72).to(dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert isinstance(lora_args_of(layer).weight, NF4Weight)
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [A, B], dtype, ["y", "dx", "dA", "dB"])


def test_lora_linear_fp32_adapter_on_bf16_activations_matches_peft():
    # fp32 adapters on a bf16 model (e.g. after prepare_model_for_kbit_training): peft runs the LoRA
    # branch in fp32 and casts its result to bf16 before the add; the fused path does the same.
    layer = _lora(_nf4_base(72, 200, bias=True, compute_dtype=torch.bfloat16), lora_dtype=torch.float32)
    x = torch.randn(13, 72).to(torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [A, B], torch.bfloat16, ["y", "dx", "dA", "dB"])


def test_lora_linear_bitsandbytes_compute_dtype_matches_peft():
    # fp32 activations into a layer with bnb_4bit_compute_dtype=bf16: bitsandbytes runs the base
    # matmul in bf16 and casts back to fp32; the LoRA branch stays fp32.
    layer = _lora(_nf4_base(72, 200, compute_dtype=torch.bfloat16), lora_dtype=torch.float32)
    args = lora_args_of(layer)
    assert args.compute_dtype == torch.bfloat16
    x = torch.randn(13, 72)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    _compare(lambda x: lora_linear(x, *args), layer, x, [A, B], torch.bfloat16, ["y", "dx", "dA", "dB"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_dense_base_matches_peft(dtype):
    # load_in_4bit=False: a frozen 16/32-bit nn.Linear with a trainable bias (its gradient is given)
    base = _dense_base(72, 200, bias=True, dtype=dtype)
    base.bias.requires_grad_(True)
    layer = _lora(base, lora_dtype=dtype)
    x = torch.randn(13, 72).to(dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert not isinstance(lora_args_of(layer).weight, NF4Weight)
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [base.bias, A, B], dtype,
             ["y", "dx", "dbias", "dA", "dB"])


def test_lora_linear_under_autocast_matches_peft():
    layer = _lora(_nf4_base(72, 200), lora_dtype=torch.float32)
    x = torch.randn(13, 72)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def under_autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x)
        return run

    _compare(under_autocast(lambda x: lora_linear(x, *lora_args_of(layer))), under_autocast(layer), x, [A, B],
             torch.bfloat16, ["y", "dx", "dA", "dB"])


def test_disabled_and_merged_adapters_run_the_base_layer():
    layer = _lora(_dense_base(72, 200, bias=True))
    x = torch.randn(13, 72)
    A = layer.lora_A["default"].weight
    layer.enable_adapters(False)  # TRL's DPO reference pass: model.disable_adapter()
    args = lora_args_of(layer)
    assert args.A is None and args.B is None
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [], torch.float32, ["y", "dx"])
    A.grad = None
    lora_linear(x.requires_grad_(True), *lora_args_of(layer)).sum().backward()
    assert A.grad is None  # no gradient reaches an inactive adapter
    x = x.detach()
    layer.enable_adapters(True)
    layer.merge()
    args = lora_args_of(layer)
    assert args.A is None
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [], torch.float32, ["y", "dx"])
    layer.enable_adapters(False)  # disabled while merged: peft unmerges in its forward, we refuse
    with pytest.raises(UnsupportedLoraLayer, match="disabled on a merged layer"):
        lora_args_of(layer)


def test_the_active_adapter_is_read_at_call_time():
    # DPOTrainer adds a "ref" adapter and switches to it for the reference log-probs
    layer = _lora(_nf4_base(72, 200))
    layer.update_layer("ref", 4, lora_alpha=16, config=LoraConfig(r=4, lora_alpha=16))
    _randomize(layer, "ref", torch.float32, seed=7)
    x = torch.randn(13, 72)
    for name in ("ref", "default"):
        layer.set_adapter(name)
        args = lora_args_of(layer)
        assert args.A is layer.lora_A[name].weight and args.scaling == layer.scaling[name]
        params = [layer.lora_A[name].weight, layer.lora_B[name].weight]
        _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, params, torch.float32,
                 ["y", "dx", "dA", "dB"])


def test_the_dequantized_weight_is_never_saved_for_backward():
    layer = _lora(_nf4_base(72, 200, bias=True))
    x = torch.randn(13, 72, requires_grad=True)
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = lora_linear(x, *lora_args_of(layer))
    assert (200, 72) not in saved_shapes and (72, 200) not in saved_shapes, saved_shapes
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# lora_qkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_qkv_matches_three_peft_layers(dtype):
    # Qwen2-like: biased q/k/v, GQA sizes (q 40 = 5 heads of 8, k/v 16), different ranks; k has
    # no LoRA at all (peft's default Llama targets are q and v only).
    q = _lora(_nf4_base(72, 40, bias=True, compute_dtype=dtype, seed=0), r=4, lora_dtype=dtype, seed=1)
    k = _nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=2)
    v = _lora(_nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=3), r=6, alpha=3, lora_dtype=dtype, seed=4)
    x = torch.randn(2, 7, 72).to(dtype)
    params = _trainable([q, v])
    assert fused_linear_args(k).A is None
    _compare(lambda x: lora_qkv(x, fused_linear_args(q), fused_linear_args(k), fused_linear_args(v)),
             lambda x: (q(x), k(x), v(x)), x, params, dtype, ["q", "k", "v", "dx", "dA_q", "dB_q", "dA_v", "dB_v"])



@pytest.mark.parametrize("with_adapter", ["", "k", "qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_qkv_adapter_subsets_on_16bit_weights_match_peft(dtype, with_adapter):
    """load_in_4bit=False: frozen 16/32-bit q/k/v (three lora_linear calls, no dequantization workspace), GQA
    widths (q 40, k/v 24), biases (k's trainable), LoRA on a subset of the three, each with its own rank and
    scaling."""
    sizes, ranks = (40, 24, 24), (4, 2, 6)
    mods = []
    for i, name in enumerate("qkv"):
        base = _dense_base(72, sizes[i], bias=True, dtype=dtype, seed=i)
        base.bias.requires_grad_(name == "k")
        mods.append(_lora(base, r=ranks[i], alpha=3 + 2 * i, lora_dtype=dtype, seed=10 + i)
                    if name in with_adapter else base)
    params = _trainable(mods)
    assert len(params) == 1 + 2 * len(with_adapter)
    x = torch.randn(3, 5, 72).to(dtype)
    lora_projection.release_dequant_workspace()
    _compare(lambda x: lora_qkv(x, *(fused_linear_args(m) for m in mods)), lambda x: tuple(m(x) for m in mods),
             x, params, dtype, ["q", "k", "v", "dx"] + [f"param {i}" for i in range(len(params))])
    assert lora_projection.dequant_workspaces() == []  # 16-bit weights are not copied into a workspace


def test_lora_qkv_under_autocast_matches_peft():
    mods = [_lora(_nf4_base(72, n, bias=True, seed=i), r=2 + i, lora_dtype=torch.float32, seed=10 + i)
            for i, n in enumerate((40, 16, 16))]
    x = torch.randn(13, 72)

    def under_autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x)
        return run

    _compare(under_autocast(lambda x: lora_qkv(x, *(lora_args_of(m) for m in mods))),
             under_autocast(lambda x: tuple(m(x) for m in mods)), x, _trainable(mods), torch.bfloat16,
             ["q", "k", "v", "dx"] + [f"param {i}" for i in range(6)])


def test_lora_qkv_with_mixed_adapter_dtypes_matches_peft():
    """fp32 LoRA on q, bf16 on v over bf16 weights: no one adapter dtype for the stacked LoRA matmul, so lora_qkv
    runs the three projections as lora_linear calls; still peft's results."""
    dtype = torch.bfloat16
    q = _lora(_nf4_base(72, 40, compute_dtype=dtype, seed=0), lora_dtype=torch.float32, seed=1)
    k = _nf4_base(72, 16, compute_dtype=dtype, seed=2)
    v = _lora(_nf4_base(72, 16, compute_dtype=dtype, seed=3), r=6, lora_dtype=dtype, seed=4)
    x = torch.randn(13, 72).to(dtype)
    _compare(lambda x: lora_qkv(x, fused_linear_args(q), fused_linear_args(k), fused_linear_args(v)),
             lambda x: (q(x), k(x), v(x)), x, _trainable([q, v]), dtype,
             ["q", "k", "v", "dx", "dA_q", "dB_q", "dA_v", "dB_v"])


class _MatmulLog(TorchDispatchMode):
    """The output shapes of the aten matmuls (mm, addmm, addmm_) that run inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("engine", ENGINES)
def test_lora_qkv_runs_one_matmul_for_the_three_weights(engine):
    """One [q|k|v] matmul forward and one backward (not three), one matmul for x @ [A_q; A_k; A_v].T and one
    for the stacked dA; dx written by one matmul and updated by one more for all LoRA terms (not per projection).
    T = 14 tokens, in = 72, q 40 + k 8 + v 8 = N 56, ranks 4, 2, 6 (R = 12)."""
    mods = [_lora(_nf4_base(72, n, seed=i), r=r, seed=10 + i) for i, (n, r) in enumerate(((40, 4), (8, 2), (8, 6)))]
    x = torch.randn(14, 72, requires_grad=True)
    with use_engine(engine):
        with _MatmulLog() as forward:
            q, k, v = lora_qkv(x, *(lora_args_of(m) for m in mods))
        with _MatmulLog() as backward:
            torch.autograd.backward((q, k, v), [torch.ones_like(t) for t in (q, k, v)])
    assert forward.shapes.count((14, 56)) == 1  # x @ [W_q; W_k; W_v].T
    assert forward.shapes.count((14, 12)) == 1  # x @ [A_q; A_k; A_v].T
    assert len(forward.shapes) == 2 + 3  # and the three B terms, each into its block of the one output
    assert backward.shapes.count((14, 72)) == 2  # dx: [dq|dk|dv] @ W, then += G @ [A_q; A_k; A_v]
    assert backward.shapes.count((12, 72)) == 1  # dA of all three
    assert len(backward.shapes) == 2 + 1 + 2 * 3  # and per projection dY_p @ B_p and dB_p
    assert x.grad is not None and all(m.lora_A["default"].weight.grad is not None for m in mods)
    # q and k are views of the one output; v has its own storage, so attention keeping v keeps no more than v
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()

# ---------------------------------------------------------------------------------------------
# lora_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_mlp_matches_peft(dtype):
    # hidden 72, intermediate 200 (odd multiple of nothing in particular), 13 tokens
    gate = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=0), lora_dtype=dtype, seed=1)
    up = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=2), r=3, lora_dtype=dtype, seed=3)
    down = _lora(_nf4_base(200, 72, compute_dtype=dtype, seed=4), r=5, alpha=5, lora_dtype=dtype, seed=5)
    x = torch.randn(13, 72).to(dtype)
    params = _trainable([gate, up, down])
    _compare(lambda x: lora_mlp(x, lora_args_of(gate), lora_args_of(up), lora_args_of(down)),
             lambda x: down(F.silu(gate(x)) * up(x)), x, params, dtype,
             ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"])


def test_lora_mlp_mixed_adapters_and_dense_weights():
    # down has no adapter, gate/up are frozen bf16 nn.Linear with fp32 LoRA: the unfused dtype paths
    dtype = torch.bfloat16
    gate = _lora(_dense_base(72, 200, dtype=dtype, seed=0), lora_dtype=torch.float32, seed=1)
    up = _lora(_dense_base(72, 200, dtype=dtype, seed=2), lora_dtype=torch.float32, seed=3)
    down = _nf4_base(200, 72, compute_dtype=dtype, seed=4)
    x = torch.randn(13, 72).to(dtype)
    params = _trainable([gate, up])
    _compare(lambda x: lora_mlp(x, *(fused_linear_args(m) for m in (gate, up, down))),
             lambda x: down(F.silu(gate(x)) * up(x)), x, params, dtype,
             ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up"])


def test_lora_mlp_backward_runs_once():
    # the backward writes dgate/dup over the saved gate/up outputs: a second backward must fail loudly
    mods = [_lora(_nf4_base(72, 200, seed=0)), _lora(_nf4_base(72, 200, seed=2)), _lora(_nf4_base(200, 72, seed=4))]
    x = torch.randn(13, 72, requires_grad=True)
    y = lora_mlp(x, *(lora_args_of(m) for m in mods))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------
# fastft-doctor checks the fused layers against float64 references (fastft.doctor.references, torch only, as a GPU
# user has no peft oracle at hand): they must be peft's math. fp32 on both sides, the same dequantized weights: a
# summation-order difference only (1e-5, as in _tol); a missing bias, mask or scaling is O(1).


def _float64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _reference_projection(layer, leaves, multipliers=None):
    """The float64 reference arguments of a peft LoRA layer (its NF4 weight from the NF4 definition)."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (nf4_reference(nf4_weight_of(layer.base_layer.weight)), _float64(layer.base_layer.bias), leaves[A],
            leaves[B], layer.scaling["default"], multipliers)


def test_the_doctors_float64_lora_references_are_peft():
    x = torch.randn(13, 72)
    gate = _lora(_nf4_base(72, 200, bias=True, seed=0), seed=1, lora_dropout=0.25)
    up = _lora(_nf4_base(72, 200, seed=2), r=3, seed=3)
    down = _lora(_nf4_base(200, 72, seed=4), r=5, alpha=5, seed=5)
    mask = (torch.rand(13, 72, generator=torch.Generator().manual_seed(6)) >= 0.25).float() / 0.75
    gate.lora_dropout["default"] = FixedDropoutMask(mask)
    params = _trainable([gate, up, down])
    grads_out = [torch.randn(13, 72)]
    expected = _run(lambda x: down(F.silu(gate(x)) * up(x)), x, params, grads_out)
    leaves = {p: _float64(p) for p in params}
    x64 = x.double().requires_grad_()
    y = lora_mlp_reference(x64, _reference_projection(gate, leaves, mask.double()), _reference_projection(up, leaves),
                           _reference_projection(down, leaves))
    y.backward(grads_out[0].double())
    got = [y, x64.grad] + [leaves[p].grad for p in params]
    for name, a, e in zip(["y", "dx"] + [f"param {i}" for i in range(len(params))], got, expected):
        assert_close(a, e, name=name, **_tol(torch.float32, e))
    # and one projection alone, with its bias and the mask
    expected = _run(gate, x, _trainable([gate]), [torch.ones(13, 200)])
    leaves = {p: _float64(p) for p in _trainable([gate])}
    x64 = x.double().requires_grad_()
    y = lora_projection_reference(x64, *_reference_projection(gate, leaves, mask.double()))
    y.backward(torch.ones(13, 200, dtype=torch.float64))
    got = [y, x64.grad] + [leaf.grad for leaf in leaves.values()]
    for name, a, e in zip(["y", "dx", "dA", "dB"], got, expected):
        assert_close(a, e, name=name, **_tol(torch.float32, e))


# ---------------------------------------------------------------------------------------------
# lora_mlp_gate_up: Phi-3's MLP, gate and up one projection with one LoRA


def _phi3_mlp(gate_up, down):
    """transformers' Phi3MLP forward over peft layers: gate, up = chunk(gate_up(x), 2); down(up * silu(gate))."""
    def forward(x):
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(up * F.silu(gate))
    return forward


def _gate_up_layers(dtype, lora_dropout=0.0, dense=False):
    # hidden 72, intermediate 100 (gate_up 200 rows), ranks 4 and 5
    if dense:  # frozen bf16 nn.Linear gate_up with an fp32 adapter (the unfused dtype path), NF4 down without one
        gate_up = _lora(_dense_base(72, 200, dtype=dtype, seed=0), lora_dtype=torch.float32, seed=1)
        return gate_up, _nf4_base(100, 72, compute_dtype=dtype, seed=4)
    gate_up = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=0), lora_dtype=dtype, seed=1,
                    lora_dropout=lora_dropout)
    down = _lora(_nf4_base(100, 72, compute_dtype=dtype, seed=4), r=5, alpha=5, lora_dtype=dtype, seed=5,
                 lora_dropout=lora_dropout)
    return gate_up, down


@pytest.mark.parametrize("dtype, chunk_tokens", [(torch.float32, None), (torch.float32, 1), (torch.float32, 4),
                                                 (torch.float16, None), (torch.float16, 4)])
def test_lora_mlp_gate_up_matches_phi3_mlp_over_peft(dtype, chunk_tokens):
    """One LoRA on the fused [2I, H] gate_up weight (as peft puts it on Phi-3's gate_up_proj): outputs, dx and the
    LoRA gradients of gate_up and down equal transformers' Phi3MLP math over peft's layers; in token chunks too
    (1 token, uneven 4+4+4+1)."""
    gate_up, down = _gate_up_layers(dtype)
    x = torch.randn(13, 72).to(dtype)
    _compare(lambda x: lora_mlp_gate_up(x, lora_args_of(gate_up), lora_args_of(down), chunk_tokens=chunk_tokens),
             _phi3_mlp(gate_up, down), x, _trainable([gate_up, down]), dtype,
             ["y", "dx", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down"])


def test_lora_mlp_gate_up_dense_weight_and_fp32_adapter_matches_peft():
    dtype = torch.bfloat16
    gate_up, down = _gate_up_layers(dtype, dense=True)
    x = torch.randn(2, 7, 72).to(dtype)
    _compare(lambda x: lora_mlp_gate_up(x, *(fused_linear_args(m) for m in (gate_up, down))),
             _phi3_mlp(gate_up, down), x, _trainable([gate_up]), dtype, ["y", "dx", "dA_gate_up", "dB_gate_up"])


@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_lora_mlp_gate_up_with_dropout_matches_peft_with_the_same_masks(chunk_tokens):
    """One mask over x for gate_up (peft's one nn.Dropout), one over h for down."""
    dtype = torch.float32
    gate_up, down = _gate_up_layers(dtype, lora_dropout=0.25)
    x = torch.randn(13, 72).to(dtype)
    _compare_dropout(lambda x: lora_mlp_gate_up(x, lora_args_of(gate_up), lora_args_of(down),
                                                chunk_tokens=chunk_tokens),
                     _phi3_mlp(gate_up, down), x, _trainable([gate_up, down]), dtype,
                     ["y", "dx", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down"],
                     [(gate_up, (13, 72)), (down, (13, 100))])


def test_lora_mlp_gate_up_keeps_one_gate_up_output_and_no_activation():
    """Unchunked, the forward keeps x, the one [T, 2I] gate_up output (g and u side by side: Llama's two [T, I]) and
    the [T, r] products; no [T, I] activation h. In chunks, no [T, 2I] or [T, I] tensor at all. Its backward runs
    once (it overwrites that output with its gradient)."""
    gate_up, down = _gate_up_layers(torch.float32)
    x = torch.randn(13, 72, requires_grad=True)
    for chunk_tokens, expected in ((None, 1), (5, 0)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = lora_mlp_gate_up(x, lora_args_of(gate_up), lora_args_of(down), chunk_tokens=chunk_tokens)
        assert saved.count((13, 200)) == expected and (13, 100) not in saved and (13, 72) in saved, saved
    y.sum().backward(retain_graph=True)
    y = lora_mlp_gate_up(x, lora_args_of(gate_up), lora_args_of(down))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.sum().backward()


def test_lora_mlp_gate_up_refuses_mismatched_shapes():
    gate_up, down = _gate_up_layers(torch.float32)
    w, b, A, B, s, cd, p = lora_args_of(gate_up)
    x = torch.randn(13, 72)
    with pytest.raises(ValueError, match="gate_up weight has 199 output features; expected an even number"):
        lora_mlp_gate_up(x, (torch.randn(199, 72), None, None, None, 1.0), lora_args_of(down))
    with pytest.raises(ValueError, match=r"down weight has shape \(200, 72\); x has 100 features"):
        lora_mlp_gate_up(x, (w, b, A, B, s), (w, None, None, None, 1.0))
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        lora_mlp_gate_up(x, (w, b, A, B, s), lora_args_of(down), chunk_tokens=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments_name_the_argument():
    layer = _lora(_nf4_base(72, 200))
    w, b, A, B, s, cd, p = lora_args_of(layer)
    x = torch.randn(13, 72)
    cases = [
        ((x.int(), w, b, A, B, s), TypeError, "x has dtype int32"),
        ((torch.randn(13, 71), w, b, A, B, s), ValueError, "x has 71 features"),
        ((x, w, b, A[:, :70], B, s), ValueError, r"A has shape \(4, 70\); expected \[r, 72\]"),
        ((x, w, b, A, B[:, :3], s), ValueError, r"B has shape \(200, 3\); expected \[200, 4\]"),
        ((x, w, b, A, None, s), ValueError, "A and B must both be tensors or both be None"),
        ((x, w, b, A, B.double(), s), TypeError, "B has dtype float64"),
        ((x, w, b, A, B, torch.tensor(2.0)), TypeError, "scaling must be a real number"),
        ((x, w, torch.zeros(199), A, B, s), ValueError, r"bias has shape \(199,\)"),
        ((x, torch.nn.Parameter(torch.randn(200, 72)), b, A, B, s), ValueError, "weight requires grad"),
        ((x, w, b, A, B, s, torch.int8), TypeError, "compute_dtype must be"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            lora_linear(*args)
    with pytest.raises(TypeError, match="k must be a"):
        lora_qkv(x, (w, b, A, B, s), (w, b), (w, b, A, B, s))
    with pytest.raises(ValueError, match="down weight has shape"):
        lora_mlp(x, (w, b, A, B, s), (w, b, A, B, s), (w, None, None, None, 1.0))


def test_unsupported_lora_layers_are_refused_with_the_reason():
    def refused(layer, message):
        with pytest.raises(UnsupportedLoraLayer, match=message):
            lora_args_of(layer)

    # lora_dropout=0.1 is served (test_lora_dropout.py)
    for module in (torch.nn.Dropout(1.0), torch.nn.AlphaDropout(0.1)):
        odd_dropout = _lora(_nf4_base(72, 200), lora_dropout=0.1)
        odd_dropout.lora_dropout["default"] = module
        refused(odd_dropout, "lora_dropout module the fused path does not serve")
    refused(_lora(_dense_base(72, 200), use_dora=True), "LoRA variant")
    refused(_lora(_dense_base(72, 200, bias=True), lora_bias=True), "lora_bias=True")

    two = _lora(_nf4_base(72, 200))
    two.update_layer("other", 4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8))
    two.set_adapter(["default", "other"])
    refused(two, "2 active adapters")

    fp4 = bnb.nn.Linear4bit(72, 200, bias=False, quant_type="fp4").to("cpu")
    refused(LoraLinear4bit(fp4, "default", LoraConfig(r=4), r=4, lora_alpha=8), "quant_type 'fp4'")
    int8 = bnb.nn.Linear8bitLt(72, 200, bias=False, has_fp16_weights=False)
    refused(LoraLinear8bitLt(int8, "default", LoraConfig(r=4), r=4, lora_alpha=8), "8-bit")

    trainable = _dense_base(72, 200)
    trainable.weight.requires_grad_(True)
    refused(_lora(trainable), "weight requires grad")
    with pytest.raises(UnsupportedLoraLayer, match="not a peft LoRA layer"):
        lora_args_of(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedLoraLayer, match="neither a linear layer"):
        fused_linear_args(torch.nn.Conv1d(4, 4, 1))
    assert issubclass(UnsupportedLoraLayer, ValueError)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 12, 13, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_mlp_in_token_chunks_matches_peft(dtype, chunk_tokens):
    """Chunks of 1 token, uneven chunks (13 = 4+4+4+1), one chunk short of T (12+1), one chunk (13) and more
    than T: the same outputs and gradients as peft's MLP, with g/u recomputed chunk by chunk."""
    gate = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=0), lora_dtype=dtype, seed=1)
    up = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=2), r=3, lora_dtype=dtype, seed=3)
    down = _lora(_nf4_base(200, 72, compute_dtype=dtype, seed=4), r=5, alpha=5, lora_dtype=dtype, seed=5)
    x = torch.randn(13, 72).to(dtype)
    params = _trainable([gate, up, down])
    _compare(lambda x: lora_mlp(x, lora_args_of(gate), lora_args_of(up), lora_args_of(down), chunk_tokens=chunk_tokens),
             lambda x: down(F.silu(gate(x)) * up(x)), x, params, dtype,
             ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"])


def test_lora_mlp_in_chunks_keeps_no_intermediate_activation():
    """In chunks, the forward keeps x and the [T, r] LoRA products only: no [T, I] tensor is saved."""
    mods = [_lora(_nf4_base(72, 200, seed=0)), _lora(_nf4_base(72, 200, seed=2)), _lora(_nf4_base(200, 72, seed=4))]
    x = torch.randn(13, 72, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lora_mlp(x, *(lora_args_of(m) for m in mods), chunk_tokens=5)
    assert (13, 200) not in saved and (13, 72) in saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lora_mlp(x, *(lora_args_of(m) for m in mods))
    assert saved.count((13, 200)) == 2  # unchunked: g and u


# ---------------------------------------------------------------------------------------------
# LoRA dropout: the fused layers draw their mask inside kernels/lora_dropout.py. The oracle is peft's own
# layer with its nn.Dropout replaced by the multipliers the fused call drew (re-drawn from the same seed and
# materialised by ``dropout_mask``, see tiny_models.py): peft's forward applies them to the LoRA branch only,
# autograd does the rest.

DROPOUT_SEED = 2024


def _compare_dropout(fused_fn, peft_fn, x, params, dtype, names, masked):
    """Like :func:`_compare`, with dropout: ``masked`` lists ``(peft layer, [T, in])`` in the order the fused
    call draws its masks. Each engine draws its own masks; peft then runs with those."""
    torch.manual_seed(123)
    grads_out = None
    for engine in ENGINES:
        with use_engine(engine):
            torch.manual_seed(DROPOUT_SEED)
            if grads_out is None:
                with torch.no_grad():
                    outs = fused_fn(x)
                outs = outs if isinstance(outs, tuple) else (outs,)
                grads_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o.dtype) for o in outs]
                torch.manual_seed(DROPOUT_SEED)
            actual = _run(fused_fn, x, params, grads_out)
            masks = drawn_dropout_masks(DROPOUT_SEED,
                                        [(layer.lora_dropout["default"].p, shape) for layer, shape in masked])
        dropouts = [layer.lora_dropout["default"] for layer, _ in masked]
        for (layer, _), multipliers in zip(masked, masks):
            assert 0 < (multipliers == 0).float().mean() < 0.5, "the mask should drop some elements, keep most"
            layer.lora_dropout["default"] = FixedDropoutMask(multipliers)
        try:
            expected = _run(peft_fn, x, params, grads_out)
        finally:
            for (layer, _), dropout in zip(masked, dropouts):
                layer.lora_dropout["default"] = dropout
        for name, a, e in zip(names, actual, expected):
            assert a.dtype == e.dtype, f"{engine} {name}: dtype {a.dtype} != peft's {e.dtype}"
            assert_close(a, e, name=f"{engine} {name} ({dtype}, dropout)", **_tol(dtype, e))


@pytest.mark.parametrize("dtype, lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
def test_lora_linear_with_dropout_matches_peft_with_the_same_mask(dtype, lora_dtype):
    # bf16 with fp32 adapters: the LoRA branch in fp32 on x cast to it (the unfused dtype path)
    layer = _lora(_nf4_base(72, 200, bias=True, compute_dtype=dtype), lora_dtype=lora_dtype, lora_dropout=0.25)
    assert lora_args_of(layer).dropout == 0.25
    x = torch.randn(13, 72).to(dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    _compare_dropout(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x, [A, B], dtype,
                     ["y", "dx", "dA", "dB"], [(layer, (13, 72))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_qkv_with_dropout_matches_peft_with_the_same_masks(dtype):
    """q and v each draw their own mask over the same x (k has no adapter, so no mask)."""
    q = _lora(_nf4_base(72, 40, bias=True, compute_dtype=dtype, seed=0), r=4, lora_dtype=dtype, seed=1,
              lora_dropout=0.25)
    k = _nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=2)
    v = _lora(_nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=3), r=6, alpha=3, lora_dtype=dtype, seed=4,
              lora_dropout=0.1)
    x = torch.randn(2, 7, 72).to(dtype)
    _compare_dropout(lambda x: lora_qkv(x, fused_linear_args(q), fused_linear_args(k), fused_linear_args(v)),
                     lambda x: (q(x), k(x), v(x)), x, _trainable([q, v]), dtype,
                     ["q", "k", "v", "dx", "dA_q", "dB_q", "dA_v", "dB_v"], [(q, (14, 72)), (v, (14, 72))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_qkv_with_dropout_on_some_adapters_matches_peft(dtype):
    """q and v with dropout (their own masks), k's adapter without (lora_dropout=0: it takes the stacked LoRA
    matmul alone): the stacked and the masked paths in one call."""
    q = _lora(_nf4_base(72, 40, bias=True, compute_dtype=dtype, seed=0), r=4, lora_dtype=dtype, seed=1,
              lora_dropout=0.25)
    k = _lora(_nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=2), r=2, alpha=5, lora_dtype=dtype, seed=3)
    v = _lora(_nf4_base(72, 16, bias=True, compute_dtype=dtype, seed=3), r=6, alpha=3, lora_dtype=dtype, seed=4,
              lora_dropout=0.1)
    assert fused_linear_args(k).dropout == 0
    x = torch.randn(2, 7, 72).to(dtype)
    _compare_dropout(lambda x: lora_qkv(x, fused_linear_args(q), fused_linear_args(k), fused_linear_args(v)),
                     lambda x: (q(x), k(x), v(x)), x, _trainable([q, k, v]), dtype,
                     ["q", "k", "v", "dx", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"],
                     [(q, (14, 72)), (v, (14, 72))])


@pytest.mark.parametrize("chunk_tokens", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_mlp_with_dropout_matches_peft_with_the_same_masks(dtype, chunk_tokens):
    """gate and up draw masks over x, down over h; in token chunks (13 = 4+4+4+1) each chunk takes its rows of
    the same masks (the reference is the unchunked one)."""
    gate = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=0), lora_dtype=dtype, seed=1, lora_dropout=0.25)
    up = _lora(_nf4_base(72, 200, compute_dtype=dtype, seed=2), r=3, lora_dtype=dtype, seed=3, lora_dropout=0.25)
    down = _lora(_nf4_base(200, 72, compute_dtype=dtype, seed=4), r=5, alpha=5, lora_dtype=dtype, seed=5,
                 lora_dropout=0.25)
    x = torch.randn(13, 72).to(dtype)
    _compare_dropout(lambda x: lora_mlp(x, lora_args_of(gate), lora_args_of(up), lora_args_of(down),
                                        chunk_tokens=chunk_tokens),
                     lambda x: down(F.silu(gate(x)) * up(x)), x, _trainable([gate, up, down]), dtype,
                     ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"],
                     [(gate, (13, 72)), (up, (13, 72)), (down, (13, 200))])


def _dropout_mlp_and_qkv(p, dtype=torch.float32):
    """q/k/v and gate/up/down peft layers (all with adapters) and a function running lora_qkv then lora_mlp."""
    qkv = [_lora(_nf4_base(72, n, compute_dtype=dtype, seed=i), lora_dtype=dtype, seed=10 + i, lora_dropout=p)
           for i, n in enumerate((40, 16, 16))]
    mlp = [_lora(_nf4_base(i, o, compute_dtype=dtype, seed=3 + n), lora_dtype=dtype, seed=20 + n, lora_dropout=p)
           for n, (i, o) in enumerate(((72, 200), (72, 200), (200, 72)))]

    def block(x):
        q, k, v = lora_qkv(x, *(lora_args_of(m) for m in qkv))
        return lora_mlp(x + torch.cat([q, k, v], -1)[..., :72], *(lora_args_of(m) for m in mlp), chunk_tokens=5)

    return qkv + mlp, block


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_is_off_at_p0_and_in_eval_mode(engine, monkeypatch):
    """p = 0 and eval mode take the path without dropout: no dropout kernel runs, no random number is drawn;
    eval mode matches peft's eval forward."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a dropout kernel ran without dropout")

    # (import_module: the attribute fastft.kernels.lora_qkv is the function, which shadows the module)
    for module in ("fastft.kernels.lora_projection", "fastft.kernels.lora_qkv"):
        for name in ("dropout_lora_a", "dropout_lora_grad_a", "dropout_lora_grad_x_"):
            monkeypatch.setattr(importlib.import_module(module), name, forbidden)
    x = torch.randn(13, 72, requires_grad=True)
    for p, training in ((0.0, True), (0.25, False)):
        layers, block = _dropout_mlp_and_qkv(p)
        for layer in layers:
            layer.train(training)
        assert all(lora_args_of(layer).dropout == 0 for layer in layers)
        rng = torch.get_rng_state()
        with use_engine(engine):
            block(x).sum().backward()
        assert torch.equal(torch.get_rng_state(), rng), "the path without dropout drew random numbers"
    layer = _lora(_dense_base(72, 200), lora_dropout=0.25).eval()  # (an eval-mode NF4 layer repacks on the CPU)
    _compare(lambda x: lora_linear(x, *lora_args_of(layer)), layer, x.detach(), _trainable([layer]), torch.float32,
             ["y", "dx", "dA", "dB"])


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_off_is_bit_identical_to_the_path_without_dropout(engine):
    """peft's nn.Identity (lora_dropout=0) is the path the fused layers took before dropout was fused; an
    nn.Dropout in eval mode or with p = 0 takes exactly that path: the same outputs and gradients, bit for bit."""
    layers, block = _dropout_mlp_and_qkv(0.25)
    params = _trainable(layers)
    x = torch.randn(13, 72)

    def fn(x):
        return block(x), lora_linear(x, *lora_args_of(layers[0]))

    grads_out = [torch.ones(13, 72), torch.ones(13, 40)]
    runs = {}
    for variant, make in (("identity", torch.nn.Identity), ("eval", lambda: torch.nn.Dropout(0.25).eval()),
                          ("p=0", lambda: torch.nn.Dropout(0.0))):
        for layer in layers:
            layer.lora_dropout["default"] = make()
        with use_engine(engine):
            runs[variant] = _run(fn, x, params, grads_out)
    for variant in ("eval", "p=0"):
        for i, (a, b) in enumerate(zip(runs[variant], runs["identity"])):
            assert torch.equal(a, b), f"{variant}: result {i} differs from the path without dropout"


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_under_gradient_checkpointing_gives_the_same_gradients(engine, use_reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward with the RNG state restored: the recompute
    must draw the same masks as the original forward, so the gradients equal an un-checkpointed run's."""
    layers, block = _dropout_mlp_and_qkv(0.25)
    params = _trainable(layers)
    x = torch.randn(13, 72)
    grads = {}
    for checkpointed in (False, True):
        torch.manual_seed(DROPOUT_SEED)
        run = (lambda x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)) if checkpointed \
            else block
        with use_engine(engine):
            grads[checkpointed] = _run(run, x, params, [torch.ones(13, 72)])
    for name, a, b in zip(["y", "dx"] + [f"param {i}" for i in range(len(params))], grads[True], grads[False]):
        assert torch.equal(a, b), f"{name} differs under checkpointing"
    torch.manual_seed(DROPOUT_SEED + 1)
    with use_engine(engine):
        other = _run(block, x, params, [torch.ones(13, 72)])
    assert not torch.equal(other[2], grads[False][2]), "another seed should draw other masks"


def test_dropout_saves_no_mask_and_no_dropped_input():
    """What the fused layers keep for the backward is the same with dropout as without: x itself and the [T, r]
    LoRA products (plus, unchunked, lora_mlp's g and u); no [T, in] mask or dropped copy of x."""
    x = torch.randn(13, 72, requires_grad=True)
    kept = {}
    for p in (0.0, 0.25):
        layers, _ = _dropout_mlp_and_qkv(p)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.data_ptr())) or t,
                                                      lambda t: t):
            lora_qkv(x, *(lora_args_of(m) for m in layers[:3]))
            lora_linear(x, *lora_args_of(layers[0]))
            lora_mlp(x, *(lora_args_of(m) for m in layers[3:]))
        kept[p] = saved
    assert [shape for shape, _ in kept[0.25]] == [shape for shape, _ in kept[0.0]]
    big = [ptr for shape, ptr in kept[0.25] if shape == (13, 72)]
    assert big and all(ptr == x.data_ptr() for ptr in big), "a [T, in] tensor other than x itself is kept"

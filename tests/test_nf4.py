"""NF4 dequantization (kernels/nf4.py) and the bitsandbytes adapter (fastft/quant.py), against
bitsandbytes itself.

Dequantization is table look-ups and one multiply (plus one multiply-add for double-quantized
scales), computed in fp32 and rounded once, exactly like bitsandbytes: results must be EQUAL, in
fp32, fp16 and bf16, on both engines.
"""
import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from kernel_testing import DTYPES, ENGINES, assert_close
from tiny_models import bnb_cpu_reference_ok

from fastft.doctor.references import nf4_reference
from fastft.kernels._common import use_engine
from fastft.kernels.nf4 import NF4Weight, dequantize_nf4
from fastft.quant import UnsupportedWeight, dequantize_4bit, nf4_weight_of


def _quantize(shape, blocksize, double_quant, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape, dtype=dtype) * 0.05
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _nf4_weight(packed, qs) -> NF4Weight:
    nested = {}
    if qs.nested:
        nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      nested_blocksize=qs.state2.blocksize, offset=qs.offset)
    return NF4Weight(packed=packed.view(torch.uint8).reshape(-1), absmax=qs.absmax, code=qs.code,
                     blocksize=qs.blocksize, shape=qs.shape, dtype=qs.dtype, **nested)


def _assert_equal(actual, expected, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert_close(actual, expected, atol=0, rtol=0, name=name)


# Odd shapes: 3x200 (blocks straddle rows), 333x72 (12 programs), 7x9 (odd element count: a half-used last byte).
@pytest.mark.parametrize("shape", [(3, 200), (333, 72), (7, 9)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes(shape, blocksize, double_quant):
    assert bnb_cpu_reference_ok(shape[-1], blocksize)  # the reference is bitsandbytes' CPU path
    for dtype in DTYPES:
        packed, qs = _quantize(shape, blocksize, double_quant, dtype)
        expected = F.dequantize_4bit(packed, qs)
        w = _nf4_weight(packed, qs)
        _assert_equal(dequantize_nf4(w), expected, f"triton {dtype}")
        with use_engine("torch"):
            _assert_equal(dequantize_nf4(w), expected, f"torch {dtype}")


@pytest.mark.parametrize("double_quant", [False, True])
def test_pytorch_engine_in_chunks_equals_bitsandbytes(double_quant, monkeypatch):
    """The PyTorch engine (a GPU with "nf4" disabled runs it) dequantizes a few blocks at a time to bound its
    temporaries: chunk boundaries inside the weight, a last chunk that is partial and ends in a half-used byte."""
    import fastft.kernels.nf4 as nf4

    packed, qs = _quantize((41, 59), 64, double_quant)  # 2,419 elements: 37.8 blocks of 64, an odd count
    expected = F.dequantize_4bit(packed, qs)
    monkeypatch.setattr(nf4, "_TORCH_CHUNK", 256)  # 9 full chunks, then 115 elements
    with use_engine("torch"):
        _assert_equal(dequantize_nf4(_nf4_weight(packed, qs)), expected, "torch engine in chunks of 256")


def _nf4_definition(packed, qs) -> torch.Tensor:
    """float64 NF4 from the definition (fastft.doctor.references.nf4_reference) of bitsandbytes' packed codes."""
    return nf4_reference(_nf4_weight(packed, qs))


# in_features that are multiples of 16 but not of 64: bitsandbytes 0.50.2's CPU path gets these wrong (96x96: 25%
# off), so the reference is the NF4 definition itself. Tolerance: fp32 math (up to three roundings for double-quant
# scales, 2**-22) then one rounding to the result dtype (1 ulp).
DEFINITION_RTOL = {torch.float32: 2**-22, torch.bfloat16: 2**-8, torch.float16: 2**-10}


@pytest.mark.parametrize("shape", [(96, 96), (64, 96), (2, 96), (96, 32), (5, 80), (33, 160)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_nf4_definition_where_bitsandbytes_cpu_is_wrong(shape, double_quant):
    assert not bnb_cpu_reference_ok(shape[-1])
    for dtype in DTYPES:
        packed, qs = _quantize(shape, 64, double_quant, dtype)
        expected = _nf4_definition(packed, qs)
        w = _nf4_weight(packed, qs)
        for engine in ENGINES:
            with use_engine(engine):
                got = dequantize_nf4(w)
            assert got.dtype == dtype
            assert_close(got, expected, atol=0, rtol=DEFINITION_RTOL[dtype], name=f"{engine} {dtype}")


def test_bitsandbytes_cpu_reference_rule():
    """tiny_models.bnb_cpu_reference_ok, which guards every test whose reference is bitsandbytes' CPU path, holds
    for the installed bitsandbytes: wherever it says ok, bitsandbytes equals the NF4 definition (even in_features:
    its C kernel; odd ones go to its PyTorch backend)."""
    for in_features in range(2, 301, 2):
        if bnb_cpu_reference_ok(in_features):
            packed, qs = _quantize((8, in_features), 64, True, seed=in_features)
            expected = _nf4_definition(packed, qs)
            assert_close(F.dequantize_4bit(packed, qs), expected, atol=0, rtol=2**-22, name=f"in={in_features}")


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes_reference_backend(double_quant):
    # bitsandbytes 0.50.2's CPU C kernel mis-dequantizes some layouts where blocks straddle rows
    # (e.g. 5x48, blocksize 32); its device-independent PyTorch backend (the CUDA semantics) is
    # the reference there. (__wrapped__: the function without its torch.compile wrapper; imported here: older
    # bitsandbytes, which the rest of this file runs on, has no such function.)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, qs = _quantize((5, 48), 32, double_quant)
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    expected = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape,
                                                    qs.dtype)
    w = _nf4_weight(packed, qs)
    _assert_equal(dequantize_nf4(w), expected, "triton")
    with use_engine("torch"):
        _assert_equal(dequantize_nf4(w), expected, "torch")


def test_out_buffer_and_result_dtype():
    # fp32 weights dequantized straight into bf16/fp16 round once from fp32: equal to casting
    # bitsandbytes' fp32 result (under the interpreter the kernel rounds bf16 by hand).
    assert bnb_cpu_reference_ok(40)
    packed, qs = _quantize((13, 40), 64, True)
    expected32 = F.dequantize_4bit(packed, qs)
    w = _nf4_weight(packed, qs)
    for engine in ENGINES:
        with use_engine(engine):
            for dtype in (torch.bfloat16, torch.float16):
                _assert_equal(dequantize_nf4(w, dtype=dtype), expected32.to(dtype), f"{engine} dtype={dtype}")
                out = torch.full((13, 40), float("nan"), dtype=dtype)
                result = w.dequantize(out=out)
                assert result.data_ptr() == out.data_ptr()
                _assert_equal(out, expected32.to(dtype), f"{engine} out={dtype}")


def test_dequantize_4bit_of_linear4bit_layer():
    assert bnb_cpu_reference_ok(72)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        layer = bnb.nn.Linear4bit(72, 200, bias=False, quant_type="nf4", compress_statistics=True)
        layer.weight.data = (torch.randn(200, 72) * 0.05).to(dtype)
        layer = layer.to("cpu")  # quantizes
        expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert expected.dtype == dtype
        _assert_equal(dequantize_4bit(layer.weight), expected, f"Params4bit {dtype}")
        _assert_equal(dequantize_4bit(layer), expected, f"Linear4bit {dtype}")
        w = nf4_weight_of(layer.weight)
        assert w.double_quant and w.shape == (200, 72) and w.dtype == dtype
        assert w.packed.data_ptr() == layer.weight.data.data_ptr()  # a view, no copy


def _bf16_scales_reference(packed, qs):
    """What a CPU-packed layer computes with: the same codes, per-block scales rounded to bf16."""
    absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    absmax = absmax.to(torch.bfloat16).float()
    plain = F.QuantState(absmax=absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                         quant_type="nf4", dtype=qs.dtype)
    return F.dequantize_4bit(packed, plain)


def test_cpu_packed_layout_is_detected_and_unpacked():
    # bitsandbytes' repacking for AVX512-BF16 CPUs, called directly: runs on any CPU.
    packed, qs = _quantize((64, 128), 64, True)
    expected = _bf16_scales_reference(packed, qs)
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=64,
                              compress_statistics=True, quant_type="nf4", bnb_quantized=True)
    param.data, param.quant_state = F._convert_weight_packed_for_cpu(param.data, param.quant_state)
    assert param.quant_state.packing_format_for_cpu
    _assert_equal(dequantize_4bit(param), expected, "unpacked")
    with use_engine("torch"):
        _assert_equal(dequantize_4bit(param), expected, "unpacked, torch engine")
    assert nf4_weight_of(param) is nf4_weight_of(param)  # converted once, cached


def test_cpu_packed_layout_after_eval_forward():
    # A real Linear4bit in eval mode under no_grad: repacked on CPUs with AVX512-BF16 (this test
    # checks whichever happens on this CPU), and fastft reads the right weights either way.
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True,
                              compute_dtype=torch.bfloat16)
    layer.weight.data = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
    layer = layer.to("cpu")
    before = dequantize_4bit(layer)
    expected = _bf16_scales_reference(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    repacked = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    assert repacked == bool(F.has_avx512bf16())
    after = dequantize_4bit(layer)
    _assert_equal(after, expected if repacked else before, "after the eval forward")
    # and these are the weights the layer computes with (its bf16 kernel: bf16 rounding of the sums)
    assert_close(y, (x.float() @ after.float().t()).to(torch.bfloat16), atol=1e-2, rtol=1e-2, name="layer output")


def test_refuses_weights_that_are_not_nf4():
    torch.manual_seed(0)
    fp4 = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    with pytest.raises(UnsupportedWeight, match="quant_type 'fp4'"):
        nf4_weight_of(fp4.weight)
    with pytest.raises(UnsupportedWeight, match="8-bit"):
        nf4_weight_of(bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False))
    with pytest.raises(UnsupportedWeight, match="plain float32"):
        nf4_weight_of(torch.nn.Parameter(torch.randn(32, 64)))
    not_yet = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # quantized only when moved to a device
    with pytest.raises(UnsupportedWeight, match="not quantized yet"):
        nf4_weight_of(not_yet.weight)
    assert isinstance(UnsupportedWeight("x"), ValueError)


def test_nf4_weight_validation_names_the_field():
    packed, qs = _quantize((10, 64), 64, True)
    good = dict(packed=packed.reshape(-1), absmax=qs.absmax, code=qs.code, blocksize=64, shape=(10, 64),
                dtype=torch.float32, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                nested_blocksize=256, offset=float(qs.offset))
    w = NF4Weight(**good)
    assert isinstance(w.offset, torch.Tensor)  # a float offset becomes a 1-element tensor
    _assert_equal(dequantize_nf4(w), F.dequantize_4bit(packed, qs), "float offset")
    bad_cases = [
        (dict(packed=packed.reshape(-1)[:-1]), ValueError, "packed has 319 bytes"),
        (dict(packed=packed.reshape(-1).float()), TypeError, "packed has dtype float32"),
        (dict(absmax=qs.absmax[:-1]), ValueError, "absmax has 9 entries"),
        (dict(code=qs.code[:8]), ValueError, "code must have 16"),
        (dict(blocksize=48), ValueError, "blocksize must be one of"),
        (dict(shape=(10, 64, 1)), ValueError, r"shape must be \(out, in\)"),
        (dict(dtype=torch.int8), TypeError, "dtype must be float32"),
        (dict(nested_absmax=None), ValueError, "nested_absmax, nested_code"),
        (dict(nested_code=qs.state2.code[:100]), ValueError, "nested_code must have 256"),
    ]
    for change, error, message in bad_cases:
        with pytest.raises(error, match=message):
            NF4Weight(**{**good, **change})
    with pytest.raises(ValueError, match="out must be a contiguous tensor of shape"):
        dequantize_nf4(w, out=torch.empty(64, 10))
    with pytest.raises(TypeError, match="out has dtype int32"):
        dequantize_nf4(w, out=torch.empty(10, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be an NF4Weight"):
        dequantize_nf4(packed)

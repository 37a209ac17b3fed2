"""fastft.kernels.rope against the float64 reference of fastft.doctor.references (itself checked against
transformers' apply_rotary_pos_emb run in float64)."""
import pytest
import torch
from kernel_testing import BF16, DTYPES, ENGINES, EPS, F32, assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from fastft.doctor.references import rope_reference, rope_tables
from fastft.kernels import use_engine
from fastft.kernels.rope import apply_rope


def _hf_views(B, T, H, D, dtype, gen):
    """q or k the way HF's attention makes them: proj(x).view(B, T, H, D).transpose(1, 2)."""
    proj_out = torch.randn(B, T, H * D, generator=gen).to(dtype)
    return proj_out.view(B, T, H, D).transpose(1, 2).detach().requires_grad_()


def _run(q, k, cos, sin, engine, seed):
    with use_engine(engine):
        q_embed, k_embed = apply_rope(q, k, cos, sin)
    gen = torch.Generator().manual_seed(seed)
    dq_embed = torch.randn(q_embed.shape, generator=gen).to(q.dtype)
    dk_embed = torch.randn(k_embed.shape, generator=gen).to(k.dtype)
    torch.autograd.backward((q_embed, k_embed), (dq_embed, dk_embed))
    return q_embed, k_embed, dq_embed, dk_embed


def _check(q, k, cos, sin, q_embed, k_embed, dq_embed, dk_embed, transformers_rope=None):
    """Against the float64 reference (fastft-doctor's), or a transformers RoPE function run in float64."""
    if transformers_rope is None:
        ref_q, ref_k, ref_dq, ref_dk = rope_reference(q, k, cos, sin, dq_embed, dk_embed)
    else:
        q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        ref_q, ref_k = transformers_rope(q64, k64, cos.double(), sin.double())
        torch.autograd.backward((ref_q, ref_k), (dq_embed.double(), dk_embed.double()))
        ref_dq, ref_dk = q64.grad, k64.grad
    assert q_embed.dtype == q.dtype and k_embed.dtype == k.dtype
    # Each output is a*c + b*s in fp32, rounded once to the dtype: 1 ulp relative covers
    # round-to-nearest and the interpreter's bf16 truncation; atol covers fp32 cancellation
    # between the two products (scale = max|x| * (max|cos| + max|sin|)).
    rtol = max(EPS[q.dtype], 1e-6)
    table = cos.double().abs().max().item() + sin.double().abs().max().item()
    for name, got, want, x in (
        ("q_embed", q_embed, ref_q, q),
        ("k_embed", k_embed, ref_k, k),
        ("dq", q.grad, ref_dq, dq_embed),
        ("dk", k.grad, ref_dk, dk_embed),
    ):
        atol = 1e-6 * x.double().abs().max().item() * table
        assert_close(got, want, atol=atol, rtol=rtol, name=name)


def test_reference_equals_transformers_apply_rotary_pos_emb():
    """The float64 reference (fastft-doctor's too) is HF's RoPE: per-batch tables, GQA, and general cos/sin whose
    halves differ (so rotate_half's direction matters)."""
    gen = torch.Generator().manual_seed(19)
    q, k = torch.randn(2, 6, 5, 12, generator=gen), torch.randn(2, 2, 5, 12, generator=gen)
    for cos, sin in (rope_tables(torch.arange(5)[None] + torch.tensor([[0], [9]]), 12, F32),
                     (torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen))):
        dq, dk = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
        got = rope_reference(q, k, cos, sin, dq, dk)
        q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
        hf_q, hf_k = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
        torch.autograd.backward((hf_q, hf_k), (dq.double(), dk.double()))
        for name, a, b in zip(("q_embed", "k_embed", "dq", "dk"), got, (hf_q, hf_k, q64.grad, k64.grad)):
            assert torch.equal(a, b.detach()), name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,table_batch",
    [
        (2, 5, 6, 2, 12, 1),  # GQA 3:1, cos/sin [1, T, D] broadcast over the batch
        (1, 7, 7, 1, 8, 1),  # GQA 7:1 (MQA), odd T
        (3, 9, 4, 4, 64, 3),  # per-batch tables: packed sequences with restarting positions
        (1, 3, 2, 1, 80, 1),  # HALF_D = 40, not a power of two
    ],
)
def test_matches_float64_reference(B, T, Hq, Hkv, D, table_batch, dtype, engine):
    gen = torch.Generator().manual_seed(B * 100 + T)
    q, k = _hf_views(B, T, Hq, D, dtype, gen), _hf_views(B, T, Hkv, D, dtype, gen)
    if table_batch == 1:
        position_ids = torch.arange(T)[None]
    else:
        # each row packs several documents whose positions restart at 0
        position_ids = torch.stack([torch.arange(T) % p for p in (T, 4, 3)])[:B] + torch.arange(B)[:, None] * 17
    cos, sin = rope_tables(position_ids, D, dtype)
    q_embed, k_embed, dq_embed, dk_embed = _run(q, k, cos, sin, engine, seed=T)
    _check(q, k, cos, sin, q_embed, k_embed, dq_embed, dk_embed)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,R,table_batch",
    [
        (2, 5, 6, 2, 16, 12, 1),  # Phi-4-mini's 3/4 (96 of 128), GQA 3:1: HALF_D = 6, 4 dims passed through
        (1, 7, 3, 1, 13, 8, 1),  # odd head dim: 5 dims passed through, MQA, odd T
        (3, 4, 4, 4, 24, 10, 3),  # HALF_D = 5, 14 passed (not powers of two), per-batch tables (packed rows)
        (1, 3, 2, 1, 64, 2, 1),  # a single rotated pair
    ],
)
@pytest.mark.parametrize("reference", ["phi3", "float64"])
def test_partial_rotary_matches_phi3_and_float64(B, T, Hq, Hkv, D, R, table_batch, dtype, engine, reference):
    """Partial rotary embedding (tables of R < D dims): the first R dims of every head rotated, the others passed
    through unchanged, forward and backward; against transformers' Phi3 apply_rotary_pos_emb and against the
    definition in float64."""
    gen = torch.Generator().manual_seed(B * 100 + T + D)
    q, k = _hf_views(B, T, Hq, D, dtype, gen), _hf_views(B, T, Hkv, D, dtype, gen)
    position_ids = torch.arange(T)[None] if table_batch == 1 else torch.stack([torch.arange(T) % p for p in (T, 3, 2)])
    cos, sin = rope_tables(position_ids, R, dtype)
    q_embed, k_embed, dq_embed, dk_embed = _run(q, k, cos, sin, engine, seed=T + 1)
    _check(q, k, cos, sin, q_embed, k_embed, dq_embed, dk_embed,
           transformers_rope=phi3_apply_rotary_pos_emb if reference == "phi3" else None)
    # the passed-through dims are copies: bit for bit, forward and backward
    assert torch.equal(q_embed[..., R:], q[..., R:]) and torch.equal(k_embed[..., R:], k[..., R:])
    assert torch.equal(q.grad[..., R:], dq_embed[..., R:]) and torch.equal(k.grad[..., R:], dk_embed[..., R:])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("R", [12, 8])
def test_general_tables_exercise_the_adjoint(dtype, engine, R):
    # Random cos/sin with different halves: the backward is only right if it uses the true
    # adjoint of rotate_half ([g2, -g1]), not a guess that happens to work for equal halves.
    # (Tables whose cos^2 + sin^2 != 1 are also what LongRoPE's attention scaling gives.) R = 8: partial rotary.
    gen = torch.Generator().manual_seed(11)
    B, T, Hq, Hkv, D = 2, 3, 3, 1, 12
    q, k = _hf_views(B, T, Hq, D, dtype, gen), _hf_views(B, T, Hkv, D, dtype, gen)
    cos = torch.randn(B, T, R, generator=gen).to(dtype)
    sin = torch.randn(B, T, R, generator=gen).to(dtype)
    _check(q, k, cos, sin, *_run(q, k, cos, sin, engine, seed=12))


def test_layouts():
    gen = torch.Generator().manual_seed(13)
    B, T, Hq, Hkv, D = 2, 5, 4, 2, 16
    cos, sin = rope_tables(torch.arange(T)[None], D, F32)

    # HF's transposed views: outputs and gradients keep the token-major layout
    q, k = _hf_views(B, T, Hq, D, F32, gen), _hf_views(B, T, Hkv, D, F32, gen)
    q_embed, k_embed, dq_embed, dk_embed = _run(q, k, cos, sin, "triton", seed=14)
    assert q_embed.shape == (B, Hq, T, D) and k_embed.shape == (B, Hkv, T, D)
    for t in (q_embed, k_embed, q.grad, k.grad):
        assert t.transpose(1, 2).is_contiguous()
    _check(q, k, cos, sin, q_embed, k_embed, dq_embed, dk_embed)

    # contiguous [B, H, T, D] inputs give contiguous outputs
    q = torch.randn(B, Hq, T, D, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, T, D, generator=gen).requires_grad_()
    q_embed, k_embed, dq_embed, dk_embed = _run(q, k, cos, sin, "triton", seed=15)
    assert q_embed.is_contiguous() and k_embed.is_contiguous() and q.grad.is_contiguous()
    _check(q, k, cos, sin, q_embed, k_embed, dq_embed, dk_embed)

    # a head-dim stride != 1 (copied once) and a cos/sin view with a row stride > D
    q = torch.randn(B, Hq, T, D * 2, generator=gen)[..., ::2].detach().requires_grad_()
    k = torch.randn(B, Hkv, T, D, generator=gen).requires_grad_()
    wide_cos, wide_sin = rope_tables(torch.arange(T)[None], D + 4, F32)
    cos, sin = wide_cos[..., :D], wide_sin[..., :D]
    _check(q, k, cos, sin, *_run(q, k, cos, sin, "triton", seed=16))


@pytest.mark.parametrize("engine", ENGINES)
def test_only_q_embed_used(engine):
    # k_embed gets no gradient: autograd hands the Function zeros, so dk must be exactly 0
    # (plain autograd on the PyTorch path leaves k.grad None)
    gen = torch.Generator().manual_seed(17)
    q, k = _hf_views(1, 4, 2, 8, F32, gen), _hf_views(1, 4, 1, 8, F32, gen)
    cos, sin = rope_tables(torch.arange(4)[None], 8, F32)
    with use_engine(engine):
        q_embed, _ = apply_rope(q, k, cos, sin)
    q_embed.sum().backward()
    if engine == "triton":
        assert torch.equal(k.grad, torch.zeros_like(k))
    else:
        assert k.grad is None
    ref = apply_rotary_pos_emb(q.detach().double().requires_grad_(), k.detach().double(), cos.double(), sin.double())
    assert_close(q_embed, ref[0], atol=1e-6, rtol=1e-6, name="q_embed")


def test_outputs_can_be_modified_in_place():
    # like HF's out-of-place math, the outputs are plain tensors (not views), so in-place ops work
    gen = torch.Generator().manual_seed(18)
    q, k = _hf_views(1, 3, 2, 8, F32, gen), _hf_views(1, 3, 1, 8, F32, gen)
    cos, sin = rope_tables(torch.arange(3)[None], 8, F32)
    q_embed, k_embed = apply_rope(q, k, cos, sin)
    q_embed.mul_(2)
    k_embed.add_(1)
    (q_embed.sum() + k_embed.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref_q, ref_k = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    (2 * ref_q.sum() + ref_k.sum()).backward()
    assert_close(q.grad, q64.grad, atol=1e-6, rtol=1e-6, name="dq")
    assert_close(k.grad, k64.grad, atol=1e-6, rtol=1e-6, name="dk")


def test_bad_inputs():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="even number of dims R"):
        apply_rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="even number of dims R"):  # partial rotary of an odd width
        apply_rope(q, k, cos[..., :5], sin[..., :5])
    with pytest.raises(ValueError, match="cos/sin must be"):  # tables longer than the head
        apply_rope(q[..., :6], k[..., :6], cos, sin)
    with pytest.raises(ValueError, match="cos requires grad"):
        apply_rope(q, k, cos.requires_grad_(), sin)
    cos = cos.detach()
    with pytest.raises(ValueError, match="sin requires grad"):
        apply_rope(q, k, cos, sin.requires_grad_())
    sin = sin.detach()
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has dtype torch.float32"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="q has dtype int64"):
        apply_rope(q.long(), k, cos, sin)
    with pytest.raises(TypeError, match="cos has dtype float64"):
        apply_rope(q, k, cos.double(), sin)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        apply_rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, torch.randn(1, 2, 4, 8), cos, sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, torch.randn(2, 2, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rope(q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rope(q, k, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="cos and sin must have one shape"):
        apply_rope(q, k, cos, torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="sin must have 3 dimensions"):
        apply_rope(q, k, cos, sin[0])
    with pytest.raises(ValueError, match="q on cpu, k on meta"):
        apply_rope(q, k.to("meta"), cos, sin)

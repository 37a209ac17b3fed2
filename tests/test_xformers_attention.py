"""The xformers route ("fastft_xformers"), checked on CPU: routing, masks, layouts, and a tiny model end to end.

xformers' ``memory_efficient_attention`` has no CPU implementation, so the tests replace it with a float64
reference (``xformers_reference.py``) that checks its inputs as xformers would on a GPU. Everything around the
op -- routing, the block-diagonal masks built from padding masks, cu_seq_lens and position_ids, GQA layouts, the
un-pad/re-pad -- is the code that runs on a GPU.
"""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from kernel_testing import assert_close, greedy_generate
from tiny_models import padded_batch, randomize_lora, save_tiny_model, tiny_config
from xformers_reference import use_reference_op

import fastft.attention as fastft_attention
import fastft.xformers_attention as xfa
from fastft import FastModel


@pytest.fixture
def reference_op(monkeypatch):
    return use_reference_op(monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------
CUDA = torch.device("cuda", 0)


def route(monkeypatch, capability, head_dim=64, xformers_reason=None, device=CUDA, **config):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    probed = []

    def reason(device, dtype, head_dim):
        probed.append((device, dtype, head_dim))
        return xformers_reason

    monkeypatch.setattr(xfa, "unavailable_reason", reason)
    name, log_line = fastft_attention.choose_attention(tiny_config("llama", head_dim=head_dim, **config), device,
                                                       torch.float16)
    return name, log_line, probed


def test_routing_by_compute_capability_and_head_size(monkeypatch):
    # sm_80+, a head size the kernel serves: fastft's kernel, nothing logged, xformers not asked
    assert route(monkeypatch, (8, 0)) == ("fastft", None, [])
    assert route(monkeypatch, (9, 0), head_dim=128) == ("fastft", None, [])
    assert route(monkeypatch, (8, 6), head_dim=256) == ("fastft", None, [])  # Gemma's head size

    # V100 / T4: xformers when it can run, asked for this device, dtype and head size
    name, log_line, probed = route(monkeypatch, (7, 0))
    assert name == "fastft_xformers" and probed == [(CUDA, torch.float16, 64)]
    assert "xformers" in log_line and "compute capability (7, 0) < 8.0" in log_line
    name, log_line, _ = route(monkeypatch, (7, 5), head_dim=128)
    assert name == "fastft_xformers" and "(7, 5)" in log_line

    # a head size fastft's kernel cannot serve, on any GPU
    name, log_line, _ = route(monkeypatch, (9, 0), head_dim=160)
    assert name == "fastft_xformers" and "head_dim=160" in log_line

    # xformers missing or unable: SDPA, and the log line says why not xformers
    name, log_line, _ = route(monkeypatch, (7, 0), xformers_reason="xformers is not installed (pip install ...)")
    assert name == "sdpa"
    assert "SDPA" in log_line and "(7, 0) < 8.0" in log_line and "xformers is not installed" in log_line

    # attention dropout: neither kernel has it
    name, log_line, probed = route(monkeypatch, (7, 0), attention_dropout=0.1)
    assert (name, probed) == ("sdpa", []) and "attention_dropout=0.1" in log_line

    # CPU: xformers has no CPU kernel, so it is not asked
    name, log_line, probed = route(monkeypatch, None, head_dim=48, device=torch.device("cpu"))
    assert (name, probed) == ("sdpa", []) and "head_dim=48" in log_line


def test_resolve_attention_logs_the_choice_and_checks_an_explicit_xformers(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(xfa, "unavailable_reason", lambda device, dtype, head_dim: None)
    config = tiny_config("llama")
    with caplog.at_level(logging.WARNING, logger="fastft"):
        assert fastft_attention.resolve_attention(config, CUDA, torch.float16, None) == "fastft_xformers"
    assert "xformers' memory-efficient kernel" in caplog.text
    assert fastft_attention.resolve_attention(config, CUDA, torch.float16, "sdpa") == "sdpa"

    # an explicit xformers choice that cannot run is refused at load time, with xformers' reason (real probe)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"attn_implementation='fastft_xformers' cannot run on cpu.*device=cpu"):
        fastft_attention.resolve_attention(config, torch.device("cpu"), torch.float32, "fastft_xformers")


def test_unavailable_reason_asks_xformers_own_operators():
    assert "device=cpu" in xfa.unavailable_reason(torch.device("cpu"), torch.float32, 64)
    assert "bf16 is only supported on A100+" in xfa.unavailable_reason(torch.device("cpu"), torch.bfloat16, 64)


def test_fastft_imports_and_routes_without_xformers(tmp_path):
    """xformers stays optional: with it hidden, fastft imports, registers its attention names, routes a V100 to
    SDPA saying xformers is not installed, and an explicit xformers request is a clear error."""
    code = """
import sys
sys.modules["xformers"] = None  # hidden: `import xformers` raises ImportError
import torch, transformers
import fastft.attention as attention, fastft.xformers_attention as xfa
from fastft import FastModel
attention.register()
torch.cuda.get_device_capability = lambda device=None: (7, 0)
config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1)
name, log_line = attention.choose_attention(config, torch.device("cuda", 0), torch.float16)
assert name == "sdpa" and "xformers is not installed (pip install 'fastft[xformers]')" in log_line, log_line
try:
    attention.resolve_attention(config, torch.device("cuda", 0), torch.float16, "fastft_xformers")
except ValueError as exc:
    assert "xformers is not installed" in str(exc), exc
else:
    raise AssertionError("an explicit fastft_xformers without xformers was accepted")
assert "xformers" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Masks: the block-diagonal bias equals causal attention within each sequence
# ---------------------------------------------------------------------------------------------------------
def causal_per_sequence(sequence_of_token: torch.Tensor, position_of_token: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: token i may attend token j."""
    same = sequence_of_token[:, None] == sequence_of_token[None, :]
    return same & (position_of_token[None, :] <= position_of_token[:, None])


def allowed(bias, n):
    return bias.materialize((n, n)) == 0


def test_block_diagonal_from_a_padding_mask():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],   # full
                         [1, 1, 1, 1, 0, 0, 0],   # right-padded
                         [0, 0, 0, 0, 0, 0, 0],   # no tokens at all
                         [0, 0, 1, 1, 1, 1, 1]])  # left-padded
    keep, bias = xfa._unpadded(mask)
    rows = torch.arange(4)[:, None].expand(4, 7).flatten()[keep]
    positions = (mask.cumsum(-1) - 1).flatten()[keep]
    assert keep.tolist() == mask.flatten().nonzero().flatten().tolist()
    assert bias.q_seqinfo.seqstart_py == [0, 7, 11, 16]  # the empty row is no sequence
    assert torch.equal(allowed(bias, len(keep)), causal_per_sequence(rows, positions))


def test_block_diagonal_from_cu_seq_lens():
    cu = torch.tensor([0, 5, 11, 13], dtype=torch.int32)
    sequence = torch.tensor([0] * 5 + [1] * 6 + [2] * 2)
    position = torch.tensor([*range(5), *range(6), *range(2)])
    assert torch.equal(allowed(xfa._from_cu_seqlens(cu), 13), causal_per_sequence(sequence, position))


def test_block_diagonal_from_position_ids():
    # two rows: one holds sequences of 5, 6 and 2 tokens; the other restarts once (4 + 9)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1],
                                 [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    sequence = (position_ids == 0).flatten().cumsum(0)
    bias = xfa._from_position_ids(position_ids, 2)
    assert torch.equal(allowed(bias, 26), causal_per_sequence(sequence, position_ids.flatten()))
    # no restart: one sequence per row
    plain = torch.arange(6).expand(3, 6)
    rows = torch.arange(3)[:, None].expand(3, 6).flatten()
    assert torch.equal(allowed(xfa._from_position_ids(plain, 3), 18), causal_per_sequence(rows, plain.flatten()))


# ---------------------------------------------------------------------------------------------------------
# The attention function: layouts, GQA, masks, sliding window, against a dense float64 reference
# ---------------------------------------------------------------------------------------------------------
def dense_reference(q, k, v, allowed_mask, scale):
    """q [B, Hq, T, D], k/v [B, Hkv, T, D], allowed_mask [B, T, T] -> [B, T, Hq, D], float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed_mask[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


class Module:  # what transformers hands the attention function
    is_causal = True
    num_key_value_groups = 2


def packed_case(batch, window):
    """(kwargs, allowed [B, T, T], real-token mask [B, T]) for each batch kind of 2 x 11 tokens."""
    B, T = 2, 11
    t = torch.arange(T)
    causal = t[None, :] <= t[:, None]
    if window is not None:
        causal &= (t[:, None] - t[None, :]) < window
    causal = causal.expand(B, T, T)
    real = torch.ones(B, T, dtype=torch.bool)
    if batch == "plain":
        return {"position_ids": t[None]}, causal, real
    if batch == "padded":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 8:] = 0  # right-padded
        mask[1, :3] = 0  # left-padded
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ok = (pos[:, None, :] <= pos[:, :, None]) & mask.bool()[:, None, :] & mask.bool()[:, :, None]
        if window is not None:
            ok &= (pos[:, :, None] - pos[:, None, :]) < window
        ok |= ~mask.bool()[:, :, None] & torch.eye(T, dtype=torch.bool)  # pads: any finite row (their grads are 0)
        return {"attention_mask": mask}, ok, mask.bool()
    # packed: row 0 holds sequences of 4 and 7 tokens, row 1 one of 11
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6], list(range(T))])
    seq = (position_ids == 0).cumsum(-1)
    ok = (seq[:, :, None] == seq[:, None, :]) & (position_ids[:, None, :] <= position_ids[:, :, None])
    if window is not None:
        ok &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    if batch == "position_ids":
        return {"position_ids": position_ids}, ok, real
    cu = torch.tensor([0, 4, 11, 22], dtype=torch.int32)  # alone, so that only it can describe the sequences
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 11}, ok, real


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
@pytest.mark.parametrize("batch", ["plain", "padded", "position_ids", "cu_seq_lens"])
def test_attention_function_matches_dense_reference(reference_op, batch, window):
    """GQA 6:2, head dim 16; outputs and q/k/v gradients against float64 dense attention with the mask spelled
    out. With gradients K/V are repeated per query head (4-D); without, the grouped 5-D layout is used."""
    kwargs, ok, real = packed_case(batch, window)
    mask = kwargs.pop("attention_mask", None)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=gen, requires_grad=True) for h in (6, 2, 2))
    scale = 0.3

    out, weights = xfa.xformers_attention(Module(), q, k, v, mask, scaling=scale, sliding_window=window, **kwargs)
    assert weights is None and out.shape == (2, 11, 6, 16)
    ref = dense_reference(q, k, v, ok, scale)
    assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5, name="out")
    assert (out[~real] == 0).all()
    assert reference_op == [4]

    grad_out = torch.randn(out.shape, generator=gen) * real[:, :, None, None]
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for name, g, e in zip("qkv", got, expected):
        assert torch.isfinite(e).all() and e.abs().max() > 0, f"d{name}: the reference proves nothing"
        assert_close(g, e, atol=1e-5, rtol=1e-5, name=f"d{name}")

    with torch.no_grad():
        out_no_grad, _ = xfa.xformers_attention(Module(), q, k, v, mask, scaling=scale, sliding_window=window,
                                                **kwargs)
    assert reference_op == [4, 5]
    assert_close(out_no_grad, out, atol=1e-6, rtol=1e-6, name="out without gradients")


def test_dropout_and_decoding(reference_op):
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        xfa.xformers_attention(Module(), q, k, v, None, dropout=0.1)
    # a 4D mask (decoding with a cache) goes to SDPA, not to xformers
    q1 = torch.randn(1, 4, 1, 16)
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    out, _ = xfa.xformers_attention(Module(), q1, k, v, mask, scaling=0.25)
    expected = dense_reference(q1, k, v, torch.ones(1, 1, 3, dtype=torch.bool), 0.25)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="decoding")
    assert reference_op == []


# ---------------------------------------------------------------------------------------------------------
# A tiny patched model: loss and LoRA gradients on the xformers route equal the SDPA route's
# ---------------------------------------------------------------------------------------------------------
def load(path, attn_implementation):
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32,
                                         attn_implementation=attn_implementation)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    model.train()
    return model


def loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def packed_model_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (1, 13), generator=gen)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]])
    labels = ids.clone()
    labels[0, [0, 5, 11]] = -100
    return ids, position_ids, labels, torch.tensor([0, 5, 11, 13], dtype=torch.int32)


@pytest.mark.parametrize("arch", ["llama", "mistral"], ids=["llama-gqa", "mistral-window3"])
def test_tiny_model_matches_the_sdpa_route(reference_op, tmp_path, arch):
    """GQA 4:2 (both), sliding window 3 (Mistral); padded batch and packed batches (position_ids only, and
    with the cu_seq_lens a padding-free collator sends). SDPA sees the dense masks transformers builds."""
    path = save_tiny_model(arch, tmp_path / arch)
    xformers_model, sdpa_model = load(path, "fastft_xformers"), load(path, "sdpa")
    assert xformers_model.config._attn_implementation == "fastft_xformers"
    ids, mask, labels = padded_batch()
    packed_ids, position_ids, packed_labels, cu = packed_model_batch()
    batches = {
        "padded": dict(input_ids=ids, attention_mask=mask, labels=labels),
        "position_ids": dict(input_ids=packed_ids, position_ids=position_ids, labels=packed_labels, use_cache=False),
        "cu_seq_lens": dict(input_ids=packed_ids, position_ids=position_ids, labels=packed_labels, use_cache=False,
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6),
    }
    for kind, batch in batches.items():
        reference_op.clear()
        ref_loss, ref_grads = loss_and_grads(sdpa_model, **batch)
        loss, grads = loss_and_grads(xformers_model, **batch)
        assert reference_op, f"{kind}: the xformers route did not run"
        assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name=f"{kind} loss")
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in grads.items():
            scale = ref_grads[name].abs().max().item()
            assert scale > 0, f"{name}: zero reference gradient, the comparison would prove nothing"
            assert_close(grad, ref_grads[name], atol=1e-4 * scale, rtol=1e-4, name=f"{kind} {name}")


def test_generate_matches_the_sdpa_route(reference_op, tmp_path):
    """Batched greedy generation: the prompt (left-padded) runs through the xformers route, the decoding steps
    through SDPA with the cache's 4D mask; the tokens equal the SDPA route's."""
    path = save_tiny_model("llama", tmp_path / "llama")
    xformers_model, sdpa_model = load(path, "fastft_xformers").eval(), load(path, "sdpa").eval()
    ids, mask, _ = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full and left-padded rows, as batched generation pads
    expected, got = greedy_generate(sdpa_model, ids, mask), greedy_generate(xformers_model, ids, mask)
    assert reference_op, "the prompt did not run through the xformers route"
    assert torch.equal(got, expected)

"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) with 4-bit experts and LoRA on the experts.

* The expert op (``kernels/moe_experts.py``) against a float64 reference built from merged weights
  ``W[e] + s * B[e] @ A[e]`` (peft's formulation), on awkward routings, dense and NF4 experts, fp32 and bf16.
* The NF4 experts are bitsandbytes' format per expert, loaded without ever holding a layer's 16-bit expert tensor.
* The patched model equals transformers + peft with the experts dequantized from the same NF4 codes (the fair
  reference: the Hugging Face stack cannot quantize them): logits, loss with the router's auxiliary loss, every
  LoRA gradient, padded and packed; a TRL SFT run logs the same losses.

Tolerances. fp32: both sides compute in fp32 from the same weights; only summation order differs (~1e-6
relative), so the model-level bounds of test_model_parity.py apply (a dropped LoRA term, a wrong routing weight
or a missing aux loss moves results by > 1e-2). bf16: each bf16 rounding costs at most 2^-9 relative of the value
rounded; an expert's output passes ~6 of them (dequantized weight, gu, silu(g) * u, y, the weighted
contribution, the sum), its gradients ~10, so 8 and 16 bf16 ulps (2^-7) of the largest expected magnitude bound
them with margin while a wrong term (LoRA scaled ~30% of the base here) is far outside.
"""
import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from kernel_testing import EPS, assert_close, greedy_generate
from memory_tracking import LiveTensorBytes, held_bytes
from moe_references import decode_nf4, random_lora, reference_moe
from test_model_parity import packed_batch
from test_trl import arithmetic_chats, assert_curves_match, losses, train_sft
from tiny_models import (
    check_bnb_cpu_reference,
    copy_lora,
    keep_bnb_standard_path,
    lora_grads,
    padded_batch,
    randomize_lora,
    save_random_model,
)
from tiny_tokenizer import tiny_tokenizer

from fastft import FastModel, estimate_memory, unpatch_model
from fastft.architectures import UnsupportedModelError, spec_for
from fastft.kernels import use_engine
from fastft.kernels.moe_experts import ExpertLora, moe_experts
from fastft.moe import (
    EXPERT_PARAMETERS,
    NF4ExpertsTensor,
    check_block,
    experts_quantized_while_loading,
    quantize_experts,
    sparse_blocks,
)

BF16 = torch.bfloat16
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = [f"experts.{name}" for name in EXPERT_PARAMETERS]
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral"]


@pytest.fixture(autouse=True)
def _engine(request):
    """fastft's PyTorch engine (what a CPU user runs; the autograd Functions are the same), except in tests marked
    ``triton``: under the interpreter the attention / norm / RoPE kernels take seconds per launch. They are tested
    against their references in their own files; the NF4 dequantization inside the expert op runs interpreted in
    ``test_expert_op_on_interpreted_triton_dequantization``."""
    with use_engine("triton" if request.node.get_closest_marker("triton") else "torch"):
        yield


# ---------------------------------------------------------------------------------------------
# Tiny models: dimensions multiples of 64, 4 experts, top-2, 2 layers


def moe_config(arch, **overrides):
    common = dict(vocab_size=211, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=256, rms_norm_eps=1e-5, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                  tie_word_embeddings=False)
    if arch == "qwen3_moe":  # renormalised top-k, q/k norms; layer 1 is a dense MLP (mlp_only_layers)
        config = transformers.Qwen3MoeConfig(**common, head_dim=64, num_experts=4, moe_intermediate_size=64,
                                             intermediate_size=128, norm_topk_prob=True, mlp_only_layers=[1])
    elif arch == "qwen2_moe":  # q/k/v bias, a shared expert behind a sigmoid gate, top-k not renormalised
        config = transformers.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=64,
                                             intermediate_size=128, shared_expert_intermediate_size=128,
                                             norm_topk_prob=False)
    elif arch == "mixtral":  # fp32 routing weights, renormalised
        config = transformers.MixtralConfig(**common, head_dim=64, num_local_experts=4, intermediate_size=64)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_moe(arch, path, dtype=torch.float32, max_shard_size="5GB", seed=0, **overrides):
    return save_random_model(moe_config(arch, **overrides), path, seed, dtype, max_shard_size)


# ---------------------------------------------------------------------------------------------
# Independent references


def routing(case, tokens=13, experts=4, seed=0):
    """``(top_k_index, top_k_weights)`` for an awkward routing."""
    gen = torch.Generator().manual_seed(seed)
    if case == "random":
        index = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(tokens)])
    elif case == "expert_without_tokens":  # expert 2 gets nothing
        index = torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=gen)[:2]] for _ in range(tokens)])
    elif case == "all_to_one_expert":
        index = torch.full((tokens, 1), 1)
    elif case == "top_k_equals_experts":
        index = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)])
    else:
        raise ValueError(case)
    weights = torch.softmax(torch.randn(index.shape, generator=gen), dim=-1)
    return index, weights


# ---------------------------------------------------------------------------------------------
# The expert op


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("case", ["random", "expert_without_tokens", "all_to_one_expert", "top_k_equals_experts"])
def test_expert_op_matches_float64_reference(case, nf4, dtype):
    check_expert_op(case, nf4, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_expert_op_on_interpreted_triton_dequantization(dtype):
    check_expert_op("expert_without_tokens", True, dtype)


def check_expert_op(case, nf4, dtype):
    E, H, inter, T = 4, 64, 64, 13
    gen = torch.Generator().manual_seed(0)
    W_gu, W_d = torch.randn(E, 2 * inter, H, generator=gen) * 0.1, torch.randn(E, H, inter, generator=gen) * 0.1
    if nf4:
        gate_up, down = quantize_experts(W_gu).nf4, quantize_experts(W_d).nf4
        W_gu, W_d = decode_nf4(gate_up), decode_nf4(down)  # the op dequantizes into its compute dtype
    else:
        W_gu, W_d = W_gu.to(dtype), W_d.to(dtype)
        gate_up, down = W_gu, W_d
    index, weights = routing(case, T, E)
    x = (torch.randn(T, H, generator=gen)).to(dtype)
    loras = [random_lora(E, 2 * inter, H, seed=1), random_lora(E, H, inter, seed=2)]
    loras = [(A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()) for A, B in loras]
    (A_gu, B_gu), (A_d, B_d) = loras
    x.requires_grad_(), weights.requires_grad_()
    # scalings as peft's alpha / r with r = 4
    out = moe_experts(x, index, weights, gate_up, down, ExpertLora(A_gu, B_gu, 2.0), ExpertLora(A_d, B_d, 0.5))
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(dout)

    leaves = [t.detach().double().requires_grad_() for t in (x, weights, A_gu, B_gu, A_d, B_d)]
    rx, rw, rA_gu, rB_gu, rA_d, rB_d = leaves
    ref = reference_moe(rx, index, rw, W_gu.double(), W_d.double(), ExpertLora(rA_gu, rB_gu, 2.0),
                        ExpertLora(rA_d, rB_d, 0.5))
    ref.backward(dout.double())

    fwd_ulps, grad_ulps = (8, 16) if dtype == BF16 else (16, 64)  # fp32: summation order only
    rtol = fwd_ulps * EPS[dtype]
    assert out.dtype == dtype
    assert_close(out, ref, atol=fwd_ulps * EPS[dtype] * ref.abs().max().item(), rtol=rtol, name="out")
    for name, inp, expected in zip(["dx", "d_weights", "dA_gu", "dB_gu", "dA_d", "dB_d"],
                                   [x, weights, A_gu, B_gu, A_d, B_d], [t.grad for t in leaves]):
        got = inp.grad
        scale = expected.abs().max().item()
        if case in ("expert_without_tokens", "all_to_one_expert") and name.startswith(("dA", "dB")):
            assert scale > 0  # the hit experts' adapters learn, the others get exact zeros
            unused = [e for e in range(E) if not (index == e).any()]
            assert unused and (got[unused] == 0).all(), f"{name} of experts without tokens"
        assert scale > 0, f"{name}: zero reference gradient, the test would prove nothing"
        assert got.dtype == inp.dtype  # (the routing weights stay fp32, like Mixtral's router's)
        assert_close(got, expected, atol=grad_ulps * EPS[dtype] * scale, rtol=grad_ulps * EPS[dtype], name=name)


def test_expert_op_keeps_no_dequantized_weight_for_backward():
    """Recompute, not storage: after the forward, the graph holds only its inputs and small bookkeeping, not a
    dequantized expert (nor per-token [T * k, 2I] intermediates)."""
    E, H, inter, T = 4, 64, 64, 32
    gen = torch.Generator().manual_seed(0)
    gate_up = quantize_experts(torch.randn(E, 2 * inter, H, generator=gen)).nf4
    down = quantize_experts(torch.randn(E, H, inter, generator=gen)).nf4
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    index, weights = routing("top_k_equals_experts", T, E)
    moe_experts(x, index, weights, gate_up, down).sum().backward()  # warm-up: the shared dequant workspace exists
    with LiveTensorBytes() as tracker:
        out = moe_experts(x, index, weights, gate_up, down)
        held = tracker.live - out.untyped_storage().nbytes()
    one_expert = 2 * inter * H * 4
    assert held < one_expert // 4, f"the forward keeps {held} bytes for the backward (one expert: {one_expert})"
    out.sum().backward()


def test_expert_op_checks_its_arguments():
    gen = torch.Generator().manual_seed(0)
    x, W_gu, W_d = torch.randn(5, 64, generator=gen), torch.randn(4, 128, 64), torch.randn(4, 64, 64)
    index, weights = routing("random", 5, 4)
    with pytest.raises(ValueError, match="expert ids up to 4, but there are 4 experts"):
        moe_experts(x, index + 1, weights, W_gu, W_d)
    with pytest.raises(ValueError, match=r"are not \[E, 2I, H\] and \[E, H, I\]"):
        moe_experts(x, index, weights, W_gu, W_d[:, :, :32])
    with pytest.raises(ValueError, match="requires grad"):
        moe_experts(x, index, weights, W_gu.requires_grad_(), W_d)
    A, B = random_lora(4, 64, 64)
    with pytest.raises(ValueError, match=r"expected A \[4, r, 64\], B \[4, 128, r\]"):
        moe_experts(x, index, weights, W_gu.detach(), W_d, ExpertLora(A, B, 1.0))


# ---------------------------------------------------------------------------------------------
# 4-bit experts: bitsandbytes' format per expert, a tensor that behaves as the 16-bit one


def test_experts_are_bitsandbytes_nf4_per_expert():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 128, 64, generator=gen)
    experts = quantize_experts(weights)
    nf4 = experts.nf4
    assert (experts.shape, experts.dtype) == ((3, 128, 64), torch.float32)
    for e in range(3):
        packed, state = bnb.functional.quantize_4bit(weights[e], blocksize=64, compress_statistics=True,
                                                     quant_type="nf4")
        assert torch.equal(nf4.packed[e], packed.reshape(-1)) and torch.equal(nf4.absmax[e], state.absmax)
        assert torch.equal(nf4.offset[e], state.offset.reshape(())) and state.state2.blocksize == 256
        bnb_values = bnb.functional.dequantize_4bit(packed, state)  # bitsandbytes' own dequantization
        # the NF4 definition in float64 vs bitsandbytes' fp32 arithmetic (three roundings)
        assert_close(decode_nf4(nf4)[e], bnb_values, atol=0, rtol=4 * EPS[torch.float32], name=f"expert {e}")
        assert_close(experts[e], bnb_values, atol=0, rtol=0, name=f"expert {e} read from the tensor")
    dense = decode_nf4(nf4).float()
    # any op outside fastft computes on the dequantized values
    assert_close(experts.sum(dim=(1, 2)), dense.sum(dim=(1, 2)), atol=1e-4, rtol=1e-6, name="sum")
    assert_close(torch.nn.functional.linear(torch.ones(2, 64), experts[1]), torch.ones(2, 64) @ dense[1].t(),
                 atol=1e-5, rtol=1e-6, name="linear")
    as_bf16 = experts.to(BF16)  # still 4-bit; dequantizes to bf16
    assert isinstance(as_bf16, NF4ExpertsTensor) and as_bf16.dtype == BF16
    assert torch.equal(as_bf16[2], dense[2].to(BF16))
    param = torch.nn.Parameter(experts, requires_grad=False)
    with pytest.raises(RuntimeError, match="4-bit NF4 experts, which are frozen and read-only"):
        param.data += 1


# ---------------------------------------------------------------------------------------------
# Loading


def test_loading_quantizes_each_expert_as_it_is_assembled(tmp_path):
    """The checkpoint in several shards, bf16, loaded in fp32: every tensor transformers materialises is a new
    (counted) tensor, as on a GPU. The peak of live tensor bytes stays under the 4-bit model plus one layer's
    experts in the load dtype; transformers alone holds every layer's 16-bit experts."""
    path = save_tiny_moe("qwen3_moe", tmp_path, dtype=BF16, max_shard_size="200KB", num_hidden_layers=3,
                         num_experts=8, mlp_only_layers=[])
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 4, "the checkpoint should be sharded"
    with LiveTensorBytes() as tracker:
        model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    config = model.config
    one_layer = 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size * 4  # fp32
    model_bytes = held_bytes(model)
    assert all(isinstance(getattr(block.experts, name), NF4ExpertsTensor)
               for block in sparse_blocks(model) for name in EXPERT_PARAMETERS)
    assert tracker.peak <= model_bytes + one_layer, (tracker.peak, model_bytes, one_layer)

    # the same checkpoint through transformers + bitsandbytes alone: 16-bit experts (what the bound excludes)
    with LiveTensorBytes() as tracker:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                               quantization_config=_bnb_config())
    assert not isinstance(sparse_blocks(hf)[0].experts.gate_up_proj, NF4ExpertsTensor)  # the registry is restored
    assert tracker.peak > model_bytes + config.num_hidden_layers * one_layer


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="measures the kernel's peak RSS of a process, reset through Linux's /proc/self/clear_refs")
def test_loading_host_memory_is_the_model_plus_about_one_shard(tmp_path):
    """Host memory of a 4-bit load (bf16 checkpoint in shards of one layer each, loaded in bf16), measured by the
    kernel (peak RSS) in a process of its own (``host_memory_probe.py``), for both ways transformers 5.23 reads shards.

    What the loader allocates (``pread``: no file pages in the RSS): the model, plus one parameter of one layer's
    experts in 16 bits (transformers materialises a converter's tensors together; <= a shard here, one layer's
    experts per shard), plus bitsandbytes' working set quantizing one expert on the CPU (``quantize_4bit``'s default
    kernel holds three fp32 copies of it: 12 bytes per element), plus 4 MiB of Python objects (modules, the loader's
    bookkeeping; 1.4-2 MB measured: the anonymous RSS left after loading beyond the model's tensors). Holding
    every layer's 16-bit experts would exceed it by far.
    With ``mmap`` (transformers' default on Linux), add the pages of every shard: transformers maps all shards
    before loading and unmaps them after the last parameter (``_load_pretrained_model``), so each page it has read
    stays in the RSS until the end: clean file pages, which the kernel reclaims under memory pressure, not memory
    the process needs."""
    layers, dims = 3, dict(hidden_size=512, num_experts=8, moe_intermediate_size=512, mlp_only_layers=[])
    path = save_tiny_moe("qwen3_moe", tmp_path / "model", dtype=BF16, max_shard_size="13MB",
                         num_hidden_layers=layers, **dims)
    warmup = save_tiny_moe("qwen3_moe", tmp_path / "warmup", dtype=BF16, num_hidden_layers=1, num_experts=2)
    shards = [os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")]
    probe = os.path.join(os.path.dirname(__file__), "host_memory_probe.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # every tensor its own mapping: freed at once
    run = subprocess.run([sys.executable, probe, path, warmup, "bfloat16"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])

    config = moe_config("qwen3_moe", **dims)
    expert_elements = 2 * config.moe_intermediate_size * config.hidden_size  # one expert's gate_up_proj
    every_layers_experts = layers * 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size * 2
    model_bytes = measured["pread"]["model"]
    assert len(shards) >= 3 and 2 * expert_elements * config.num_experts <= max(shards)
    bound = model_bytes + max(shards) + 12 * expert_elements + 4 * 2**20
    assert model_bytes + every_layers_experts > bound  # the bound excludes a load holding 16-bit experts
    assert measured["pread"]["peak_growth"] <= bound, (measured, bound)
    assert measured["mmap"]["peak_growth"] <= bound + sum(shards), (measured, bound, sum(shards))
    # the file pages are there: if this fails, transformers no longer keeps every shard mapped; tighten the bound
    assert measured["mmap"]["peak_growth"] > bound, (measured, bound)


def test_conversion_registry_is_restored_after_a_failed_load(tmp_path):
    from transformers.conversion_mapping import USER_REGISTERED_MAPPINGS, get_checkpoint_conversion_mapping

    def operations():
        return [type(op).__name__ for t in get_checkpoint_conversion_mapping("mixtral") for op in
                getattr(t, "operations", [])]

    before = operations()
    with pytest.raises(RuntimeError, match="boom"), experts_quantized_while_loading("mixtral"):
        assert operations() == ["QuantizeExpertsNF4", "QuantizeExpertsNF4"]
        raise RuntimeError("boom")
    assert operations() == before == ["MergeModulelist", "Concatenate", "MergeModulelist"]
    assert "mixtral" not in USER_REGISTERED_MAPPINGS


# ---------------------------------------------------------------------------------------------
# The patched model against transformers + peft


def _bnb_config(dtype=torch.float32):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def lora_config(r=4, lora_alpha=8):
    return peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=ATTENTION, target_parameters=EXPERTS,
                           task_type="CAUSAL_LM")


def load_pair(path, dtype=torch.float32):
    """fastft (4-bit experts) and transformers + bitsandbytes + peft whose experts are the NF4 codes decoded."""
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=dtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=_bnb_config(dtype), device_map="cpu", attn_implementation="eager")
    check_bnb_cpu_reference(reference)
    keep_bnb_standard_path(reference)
    with torch.no_grad():
        for ours, theirs in zip(sparse_blocks(model), sparse_blocks(reference), strict=True):
            for name in EXPERT_PARAMETERS:
                getattr(theirs.experts, name).copy_(decode_nf4(getattr(ours.experts, name).nf4))
    reference = peft.get_peft_model(reference, lora_config())
    for param in reference.parameters():  # adapters in the model's dtype, as fastft (and TRL) make them
        if param.requires_grad:
            param.data = param.data.to(dtype)
    randomize_lora(reference)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    copy_lora(reference, model)
    return reference, model


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(reference, fastft model) of one architecture, shared by the tests below (they only run steps)."""
    with use_engine("torch"):
        return load_pair(save_tiny_moe(request.param, tmp_path_factory.mktemp(request.param)))


def assert_grads_match(got, expected):
    assert got.keys() == expected.keys() and any("experts" in name for name in got)
    for name in expected:
        scale = expected[name].abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero, the test would prove nothing"
        assert_close(got[name], expected[name], atol=1e-4 * scale, rtol=1e-4, name=name)


def step(model, **batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_router_logits=True, use_cache=False)
    out.loss.backward()
    return out, lora_grads(model)


def test_logits_loss_with_aux_loss_and_lora_grads_match_hf(pair):
    reference, model = pair
    ids, mask, labels = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference.eval(), model.eval()
        ref_logits = reference(input_ids=ids, attention_mask=mask).logits
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5, name="logits")

    ref_out, ref_grads = step(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out, grads = step(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.aux_loss, ref_out.aux_loss, atol=1e-6, rtol=1e-6, name="aux_loss")
    assert_close(out.loss, ref_out.loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)
    # the auxiliary loss is part of it: without it the loss moves by more than the tolerance
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False).loss
    assert abs(plain - out.loss) > 1e-3 and out.aux_loss > 0

    # adapters disabled (DPO's reference pass): the experts without their LoRA
    with torch.no_grad():
        with reference.disable_adapter():
            ref_disabled = reference(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
    assert_close(disabled[real], ref_disabled[real], atol=2e-5, rtol=1e-5, name="logits, adapters disabled")
    assert (disabled - logits)[real].abs().max() > 1e-3


def test_packed_batch_matches_hf(pair):
    reference, model = pair
    ids, position_ids, labels, cu = packed_batch()
    ref_out, ref_grads = step(reference, input_ids=ids, position_ids=position_ids, labels=labels)
    out, grads = step(model, input_ids=ids, position_ids=position_ids, labels=labels, cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    assert_close(out.loss, ref_out.loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)


def test_generate_matches_hf(pair):
    """Greedy decoding with the KV cache: the MoE block on one new token at a time."""
    reference, model = pair
    ids, mask, _ = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # a full row and a left-padded one (generation continues at the end)
    reference.eval(), model.eval()
    expected = greedy_generate(reference, ids, mask, new_tokens=3)
    assert torch.equal(greedy_generate(model, ids, mask, new_tokens=3), expected)


def test_16bit_experts_match_hf(tmp_path):
    """load_in_4bit=False: the same op on the dense expert tensors, against transformers + peft in fp32."""
    path = save_tiny_moe("qwen3_moe", tmp_path)
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"), lora_config())
    randomize_lora(reference)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, load_in_4bit=False, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    copy_lora(reference, model)
    assert not any(isinstance(p, NF4ExpertsTensor) for p in model.parameters())
    ids, mask, labels = padded_batch()
    ref_out, ref_grads = step(reference, input_ids=ids, attention_mask=mask, labels=labels)
    out, grads = step(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref_out.loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)


def test_unpatched_model_computes_with_the_dequantized_experts(tmp_path):
    """After unpatch_model, transformers' own experts forward reads the 4-bit expert tensors (one expert at a time,
    dequantized) and gives the patched model's logits."""
    model, _ = FastModel.from_pretrained(save_tiny_moe("mixtral", tmp_path), max_seq_length=64, dtype=torch.float32)
    ids, mask, _ = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).logits
        unpatched = unpatch_model(model)(input_ids=ids, attention_mask=mask).logits
    assert_close(unpatched[real], patched[real], atol=2e-5, rtol=1e-5, name="logits")


def test_fused_expert_checkpoint_is_quantized_after_loading(tmp_path, caplog):
    """A checkpoint that stores the experts already as 3-D tensors passes no per-expert conversion: its experts
    load in 16 bits, and are quantized right after (with a warning), never left 16-bit in a 4-bit model."""
    from safetensors.torch import save_file

    config = moe_config("mixtral")
    model = transformers.AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with caplog.at_level("WARNING", logger="fastft"):
        loaded, _ = FastModel.from_pretrained(tmp_path, max_seq_length=64, dtype=torch.float32)
    assert "4 expert tensors were loaded in 16 bits" in caplog.text
    experts = sparse_blocks(loaded)[0].experts.gate_up_proj
    assert isinstance(experts, NF4ExpertsTensor)
    expected = quantize_experts(sparse_blocks(model)[0].experts.gate_up_proj.detach()).nf4
    assert torch.equal(experts.nf4.packed, expected.packed) and torch.equal(experts.nf4.absmax, expected.absmax)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_block_matches_hf_in_bf16(arch, tmp_path):
    """One sparse block in bf16, fastft's forward against transformers + peft's on the same input (so the router,
    the same module on both sides, routes identically), training: output and gradients within the bf16 bound above.
    Mixtral with router jitter: both sides draw the same noise after the same seed."""
    path = save_tiny_moe(arch, tmp_path, router_jitter_noise=0.1 if arch == "mixtral" else 0.0)
    reference, model = load_pair(path, dtype=BF16)
    ours, theirs = sparse_blocks(model)[0], sparse_blocks(reference)[0]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 128, generator=gen).to(BF16)
    dy = torch.randn(2, 9, 128, generator=gen).to(BF16)
    results = []
    for block, peft_model in ((theirs, reference), (ours, model)):
        peft_model.train()
        peft_model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = block(xi * 1)  # (transformers' Mixtral scales its input in place)
        y.backward(dy)
        grads = {name.split("layers.0.")[-1]: p.grad for name, p in peft_model.named_parameters()
                 if "layers.0.mlp" in name and p.grad is not None}
        results.append((y, xi.grad, grads))
    (ref_y, ref_dx, ref_grads), (y, dx, grads) = results
    assert y.dtype == BF16 and grads.keys() == ref_grads.keys() and len(grads) == 4
    tol = 8 * EPS[BF16]
    assert_close(y, ref_y, atol=tol * ref_y.abs().max().item(), rtol=tol, name="block output")
    tol = 16 * EPS[BF16]
    assert_close(dx, ref_dx, atol=tol * ref_dx.abs().max().item(), rtol=tol, name="dx")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=tol * ref_grads[name].abs().max().item(), rtol=tol, name=name)
    if arch == "mixtral":  # the jitter moved the output: the comparison above covers it
        with torch.no_grad():
            assert (ours.eval()(x) - y).abs().max() > 1e-2


@pytest.mark.slow
def test_trl_sft_loss_curve_matches_baseline(tmp_path, monkeypatch):
    """An unchanged TRL SFT script: TRL's fused lm-head path with its own auxiliary loss (router_aux_loss_coef from
    the config), 6 steps, the same losses and aux losses as the baseline (fp32 compute; TRL casts both sides' LoRA
    to bf16, the drift test_trl.py's tolerance allows). Qwen2-MoE: shared expert and q/k/v bias on top of the
    routed experts."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    reference, model = load_pair(save_tiny_moe("qwen2_moe", tmp_path / "model"))
    data = arithmetic_chats(24)
    runs = [train_sft(m, data, tmp_path / name, max_steps=6, bf16=False)
            for name, m in (("hf", reference), ("fastft", model))]
    (ref_loss, ref_aux), (loss, aux) = ([losses(t), losses(t, "aux_loss")] for t in runs)
    assert len(aux) == len(loss) == 6 and min(aux) > 0, "TRL did not add the auxiliary loss"
    assert_curves_match(loss, ref_loss)
    assert_curves_match(aux, ref_aux)
    assert loss[-1] < loss[0] - 0.1, "training did not learn: the comparison proves little"


# ---------------------------------------------------------------------------------------------
# peft: targets, a standard adapter, adapters added later


def test_default_targets_and_a_standard_adapter(tmp_path, caplog):
    path = save_tiny_moe("qwen2_moe", tmp_path / "model")
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="fastft"):
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert "LoRA on attention (q_proj, k_proj, v_proj, o_proj) and on every routed expert" in caplog.text
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in name for name in trainable) and any("q_proj" in name for name in trainable)
    assert not any(".gate." in name or "shared_expert" in name for name in trainable)  # routers stay frozen
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")

    plain = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # no fastft, 16-bit
    loaded = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter")
    ours, theirs = peft.get_peft_model_state_dict(model), peft.get_peft_model_state_dict(loaded)
    assert ours.keys() == theirs.keys() and any("experts" in key for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # an adapter added later (TRL's DPO adds "ref") wraps the experts too, and serves when active
    model.add_adapter("ref", lora_config())
    model.set_adapter("ref")
    experts = sparse_blocks(model)[0].experts
    assert "ref" in experts.lora_A and "ref" in experts.base_layer.lora_A


def test_two_active_expert_adapters_are_an_error_on_4bit_experts(tmp_path):
    path = save_tiny_moe("mixtral", tmp_path)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    model.add_adapter("other", lora_config())
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 active adapters on the experts"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_options_that_do_not_serve_moe_yet_are_errors(tmp_path):
    path = save_tiny_moe("qwen3_moe", tmp_path)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="lora_dropout=0.1: peft's LoRA on expert tensors"):
        FastModel.get_peft_model(model, lora_dropout=0.1)
    with pytest.raises(ValueError, match="mlp_chunk_tokens does not apply to mixture-of-experts"):
        FastModel.get_peft_model(model, mlp_chunk_tokens=16)
    with pytest.raises(UnsupportedModelError, match="FSDP memory accounting does not support mixture-of-experts"):
        estimate_memory(model.config, max_seq_length=64, fsdp_world_size=2)


def test_auto_checkpointing_plans_an_moe_model_with_the_accounting(tmp_path, caplog):
    """use_gradient_checkpointing="auto" plans with the MoE accounting (tests/test_memory_moe.py): a budget between
    the peaks of 1 and 0 checkpointed layers checkpoints 1; the plan trains LoRA on the experts it accounted."""
    path = save_tiny_moe("qwen3_moe", tmp_path)
    peaks = [estimate_memory(moe_config("qwen3_moe"), 64, r=4, lora_alpha=8, use_gradient_checkpointing=k).peak_gb
             for k in (0, 1)]
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="fastft"):
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="auto",
                                         memory_budget_gb=(peaks[0] + peaks[1]) / 2)
    assert [layer.gradient_checkpointing for layer in model.get_base_model().model.layers] == [True, False]
    assert f"checkpointing 1 of 2 layers; accounted peak {peaks[1]:.2f} GiB fits" in caplog.text
    assert any(".experts." in name for name, p in model.named_parameters() if p.requires_grad)


def _fail(*args, **kwargs):
    raise RuntimeError("the plan failed")


def test_a_failed_get_peft_model_removes_the_nested_expert_adapters(tmp_path, monkeypatch):
    """Issue 24.4 on MoE: peft wraps the experts once per targeted tensor (one tuner layer inside another); a
    get_peft_model that fails after the injection removes both, and the corrected call works."""
    path = save_tiny_moe("qwen2_moe", tmp_path)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    before = {name: type(module) for name, module in model.named_modules()}
    monkeypatch.setattr("fastft.checkpointing.apply_mode", _fail)
    with pytest.raises(RuntimeError, match="the plan failed"):
        FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert {name: type(module) for name, module in model.named_modules()} == before
    monkeypatch.undo()
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert any(".experts." in name for name, p in model.named_parameters() if p.requires_grad)


def test_unsupported_moe_layouts_are_clear_errors():
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts: Qwen3-MoE, Qwen2-MoE / Qwen1.5-MoE, Mixtral"):
        spec_for(transformers.OlmoeConfig())
    block = transformers.AutoModelForCausalLM.from_config(moe_config("qwen2_moe")).model.layers[0].mlp
    del block.shared_expert
    with pytest.raises(UnsupportedModelError, match=r"with a shared expert \(shared_expert, shared_expert_gate\)"):
        check_block(block, spec_for(moe_config("qwen2_moe")).moe)
    block = transformers.AutoModelForCausalLM.from_config(moe_config("mixtral")).model.layers[0].mlp
    block.experts.is_transposed = True
    with pytest.raises(UnsupportedModelError, match="experts with is_transposed=False"):
        check_block(block, spec_for(moe_config("mixtral")).moe)

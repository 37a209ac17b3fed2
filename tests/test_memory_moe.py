"""Memory accounting of mixture-of-experts models (fastft.memory): a QLoRA step of Qwen3-MoE, Qwen2-MoE and Mixtral
on meta tensors counts what the same step allocates when run for real on the CPU.

Both contenders as their users build them: ``fastft`` with NF4 experts (``FastModel``'s 4-bit loading) and LoRA on
attention and every expert (peft ``target_parameters``, ``get_peft_model``'s default); ``hf`` with transformers +
peft + bitsandbytes, whose ``load_in_4bit`` leaves the 3-D expert tensors 16-bit and whose peft folds each expert
LoRA into a full ``[E, out, in]`` weight every forward (transformers' default ``grouped_mm`` experts). Both with
the router's load-balancing loss, and every token routed to the same k experts (``route_to_the_first_experts``).

The references are independent of the accounting: the live tensor bytes of the real CPU step (fastft's kernels
interpreted) and closed-form sizes of the resident tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from fastft.memory.accounting import account_step, measure_step_on_cpu
from fastft.memory.configs import load_config
from fastft.memory.estimate import estimate_memory
from fastft.memory.plan import plan_memory
from fastft.memory.training_step import StepSetup

# Dimensions multiples of 64 (bitsandbytes' CPU 4-bit matmul, HF-STACK-NOTES.md); 4 experts, top-2, 2 layers.
COMMON = dict(vocab_size=192, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=4096, num_experts_per_tok=2, router_aux_loss_coef=0.1, tie_word_embeddings=False)
TINY = {
    # renormalised top-k, q/k norms; layer 1 a dense MLP (mlp_only_layers)
    "qwen3_moe": transformers.Qwen3MoeConfig(**COMMON, head_dim=64, num_experts=4, moe_intermediate_size=64,
                                             intermediate_size=128, norm_topk_prob=True, mlp_only_layers=[1]),
    # q/k/v biases, a shared expert behind a sigmoid gate (a 4-bit [1, H] linear layer)
    "qwen2_moe": transformers.Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=64,
                                             intermediate_size=128, shared_expert_intermediate_size=128,
                                             norm_topk_prob=False),
    # fp32 routing weights
    "mixtral": transformers.MixtralConfig(**COMMON, head_dim=64, num_local_experts=4, intermediate_size=64),
}


@pytest.fixture
def only_the_expert_kernels(monkeypatch):
    """fastft's kernels of the dense parts (attention, norms, RoPE, LoRA projections, loss) on their PyTorch engine,
    in the accounting and the real step alike: their accounting is validated by tests/test_memory.py, and interpreted
    they take most of a minute per step. The expert op keeps its GPU path (the grouped GEMM engine with the NF4
    dequantization, interpreted on the CPU), the path the accounting of a real model follows."""
    from fastft.kernels import KERNEL_NAMES

    kept = ("nf4", "moe_experts")
    monkeypatch.setenv("FASTFT_DISABLE_KERNELS", ",".join(name for name in KERNEL_NAMES if name not in kept))


@pytest.mark.usefixtures("only_the_expert_kernels")
@pytest.mark.parametrize("arch, contender, batch, loss, checkpointing", [
    ("qwen3_moe", "fastft", "padded", "labels", "on"),
    ("qwen3_moe", "hf", "padded", "labels", "on"),
    ("qwen2_moe", "fastft", "packed", "trl", "off"),
    ("qwen2_moe", "hf", "padded", "labels", "on"),
])
def test_accounted_moe_step_equals_live_bytes_measured_on_cpu(arch, contender, batch, loss, checkpointing):
    """The dense models' validation (tests/test_memory.py) for MoE models: within 1% (a missed [tokens, hidden] tensor
    is about 1% of this step; observed: equal to 272 bytes), resident bytes exactly. fp32: the GPU code path and the
    CPU one then allocate the same buffers. Padded rows: the aux loss's attention-mask path; packed rows with TRL's
    fused lm-head loss and no checkpointing: the aux loss TRL adds and every layer's activations kept. (Mixtral,
    not run here to keep the file short, gave the same agreement: 0 bytes for fastft, 272 for hf.)"""
    setup = StepSetup(contender=contender, seq_len=48, batch_size=2, batch=batch, loss=loss,
                      checkpointing=checkpointing, dtype=torch.float32)
    accounted = account_step(TINY[arch], setup, sm_count=1, cuda_workspaces=False)
    measured = measure_step_on_cpu(TINY[arch], setup)
    assert accounted.resident == measured.resident
    assert accounted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    assert accounted.peak_phase == measured.peak_phase


def _nf4_bytes(n: int, tables: bool = True) -> int:
    """bitsandbytes NF4 with double quantization: packed codes, uint8 block scales, fp32 scales of those (blocks of
    256), the fp32 offset; ``tables``: the 16-entry NF4 table and the 256-entry dynamic table."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + (16 * 4 + 256 * 4 if tables else 0)


def test_moe_resident_breakdown_matches_closed_form():
    """fastft holds every expert in NF4 (E quantizations, one pair of code tables per expert tensor), the baseline in
    16 bits; both train the same adapters: attention's four and a rank-r adapter per expert (A [E r, in], B [out,
    r E]), bf16 (TRL's cast; fastft's bf16 adapters in a bf16 model)."""
    config, r = TINY["qwen3_moe"], 8
    fastft, hf = (account_step(config, StepSetup(contender=c, seq_len=32, r=r)).resident for c in ("fastft", "hf"))
    E, H, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    experts = {"gate_up_proj": (2 * inter, H), "down_proj": (H, inter)}
    nf4 = moe_layers * sum(E * _nf4_bytes(o * i, tables=False) + 16 * 4 + 256 * 4 for o, i in experts.values())
    sixteen_bit = moe_layers * sum(E * o * i * 2 for o, i in experts.values())
    assert fastft["weights_4bit"] - hf["weights_4bit"] == nf4
    assert hf["weights_16bit"] - fastft["weights_16bit"] == sixteen_bit
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = {"q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q)}
    lora = config.num_hidden_layers * sum(r * (o + i) * 2 for o, i in attention.values())
    lora += moe_layers * sum(E * r * (o + i) * 2 for o, i in experts.values())
    assert fastft["lora_weights"] == hf["lora_weights"] == fastft["lora_grads"] == hf["lora_grads"] == lora


@pytest.mark.parametrize("name, arch, experts, k", [("qwen3-30b-a3b", "qwen3_moe", 128, 8),
                                                    ("qwen1.5-moe-a2.7b", "qwen2_moe", 60, 4),
                                                    ("mixtral-8x7b", "mixtral", 8, 2)])
def test_moe_presets_load_as_their_architectures(name, arch, experts, k):
    from fastft.architectures import spec_for

    config = load_config(name)
    assert config.model_type == arch and spec_for(config).moe is not None
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    assert (num_experts, config.num_experts_per_tok) == (experts, k)


def test_cli_accounts_qwen3_30b_a3b_in_4_bit_under_24_gib(capsys):
    """``fastft-memory qwen3-30b-a3b --seq-len 2048``: the experts in NF4 (the issue's ~17 GB: 30.5B parameters at
    about half a byte each), the step under 24 GiB. (The baseline keeps them 16-bit: about 57 GiB of weights.)"""
    from fastft.memory.cli import main

    assert main(["qwen3-30b-a3b", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b: QLoRA (4-bit NF4) r=16, batch 1 x 2,048 tokens" in out
    rows = {line[:54].strip(): float(line[54:].split()[0]) for line in out.splitlines() if line.endswith(" GiB")}
    params = 30.5e9  # published: 30.5B in total
    assert 0.5 * params / 2**30 < rows["4-bit weights and their quantization state"] < 0.6 * params / 2**30
    assert rows["resident (between steps)"] < rows["peak (max_memory_allocated, accounted)"] < 24


def test_auto_plan_of_an_moe_model_predicts_the_accounted_peak():
    """The plan's peak is the accounting of the settings it chose, and the MLP is never chunked (mlp_chunk_tokens
    does not apply to MoE blocks): past offloading the plan says it does not fit."""
    config = transformers.Qwen3MoeConfig(**{**TINY["qwen3_moe"].to_dict(), "num_hidden_layers": 4,
                                            "mlp_only_layers": []})
    tokens, lora = 512, dict(r=4, lora_alpha=8)
    peaks = [estimate_memory(config, tokens, use_gradient_checkpointing=k, **lora).peak_gb for k in range(5)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])) and peaks[1] > peaks[2]  # (the last layer's backward is
    # the peak whether it is checkpointed or not)
    plan = plan_memory(config, tokens, 1, (peaks[1] + peaks[2]) / 2, **lora)
    assert (plan.checkpointed_layers, plan.offload, plan.peak_gb) == (2, False, peaks[2]) and plan.fits
    offloaded = estimate_memory(config, tokens, use_gradient_checkpointing="offload", **lora).peak_gb
    hopeless = plan_memory(config, tokens, 1, offloaded / 2, **lora)
    assert (hopeless.offload, hopeless.mlp_chunk_tokens, hopeless.peak_gb, hopeless.fits) == (True, None, offloaded,
                                                                                              False)

"""Tiny random Llama / Qwen2 / Mistral / Qwen3 / Phi-3 checkpoints for model-level tests, and the Hugging Face + peft
baseline.

Shapes are chosen to be awkward (hidden 72, intermediate 136, GQA 4:2, vocab 211) but keep head_dim=64,
a head size fastft's attention kernel serves, so the fastft path is exercised rather than SDPA.
"""
from __future__ import annotations

import bitsandbytes as bnb
import peft
import torch
import transformers
from tiny_tokenizer import tiny_tokenizer

from fastft.doctor.numerics import drawn_dropout_masks  # noqa: F401  (the tests' and fastft-doctor's)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's fused q/k/v and gate/up layers

# Phi-4-mini's RoPE at tiny size: the first 3/4 of each head rotated (48 of 64 dims), LongRoPE factors (short up to
# original_max_position_embeddings = 16 positions, long beyond) and the attention scaling they imply
# (sqrt(1 + ln(64 / 16) / ln(16)) on cos and sin). The factors are arbitrary but distinct per frequency.
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                 "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(24)], "long_factor": [2.0 + 0.3 * i for i in range(24)]}


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=211, hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "llama31":  # Llama 3.1 RoPE scaling
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif arch in ("qwen2", "qwen2_sliding"):  # q/k/v bias, tied embeddings, its own RoPE base
        window = dict(use_sliding_window=True, sliding_window=5, max_window_layers=1) if arch == "qwen2_sliding" else {}
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0}, **window)
    elif arch == "mistral":  # Llama's shape plus a window over every layer, given to each attention call
        config = transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=3)
    elif arch == "qwen3":  # per-head RMSNorm of q and k before RoPE, no q/k/v bias
        config = transformers.Qwen3Config(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0})
    elif arch in ("phi3", "phi3_sliding"):  # fused qkv_proj and gate_up_proj; Phi-3-mini-4k's window per layer
        window = dict(sliding_window=3) if arch == "phi3_sliding" else {}
        config = transformers.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3, **window)
    elif arch == "phi3_longrope":  # Phi-4-mini: partial rotary + LongRoPE, tied embeddings; hidden = heads * head_dim
        # (Phi3Config checks the factors' length against hidden / heads), GQA 2:1
        config = transformers.Phi3Config(**dict(common, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=64), original_max_position_embeddings=16,
                                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                         rope_parameters=dict(PHI3_LONGROPE))
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_model(arch: str, path, seed: int = 0, **overrides) -> str:
    return save_random_model(tiny_config(arch, **overrides), path, seed)


def save_random_model(config, path, seed: int = 0, dtype=torch.float32, max_shard_size="5GB") -> str:
    """A random-weight checkpoint of ``config`` (with the tiny tokenizer) in ``path``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights and biases, so a dropped term shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def bnb_config(dtype=torch.float32):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def bnb_cpu_reference_ok(in_features: int, blocksize: int = 64) -> bool:
    """Whether bitsandbytes 0.50.2's CPU ``dequantize_4bit`` (so also its CPU 4-bit matmul) is right for a weight
    with ``in_features`` columns. Its C kernel is wrong when in_features is a multiple of 16 but not of the
    blocksize (measured on an AVX512 CPU: a 96x96 weight is 25% off the NF4 definition; 16, 32, 48, 80, 96, ...
    all wrong); it is exact for multiples of the blocksize (64 for Linear4bit) and for in_features that are not
    multiples of 16, such as the tiny models' 72 and 136 (tests/test_nf4.py checks this rule against the
    installed bitsandbytes). A test whose reference is bitsandbytes' CPU path must use in_features it gets right."""
    return in_features % blocksize == 0 or in_features % 16 != 0


def check_bnb_cpu_reference(model) -> None:
    """Refuse a bitsandbytes 4-bit model as a CPU reference when one of its layers hits the fault above."""
    bad = {name: m.in_features for name, m in model.named_modules()
           if isinstance(m, bnb.nn.Linear4bit) and not bnb_cpu_reference_ok(m.in_features)}
    assert not bad, f"bitsandbytes' CPU dequantization is wrong for these layers' in_features: {bad}"


def keep_bnb_standard_path(model):
    """bitsandbytes' CPU backend repacks 4-bit weights on the first eval-mode no-grad forward (on CPUs with
    AVX512-BF16), then computes in bf16, and crashes doing so when in_features is not a multiple of 64 (72
    here): keep the standard fp32 path for the reference model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_baseline(path, load_in_4bit=True, dtype=torch.float32, r=4, lora_alpha=8, lora_dropout=0.0):
    """Hugging Face + bitsandbytes + peft, eager attention: the reference fastft must match."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=bnb_config(dtype) if load_in_4bit else None,
        device_map="cpu", attn_implementation="eager")
    check_bnb_cpu_reference(model)
    keep_bnb_standard_path(model)
    targets = PHI3_LORA_TARGETS if model.config.model_type == "phi3" else LORA_TARGETS
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def randomize_lora(peft_model, seed=1, std=0.1):
    """peft initialises B to zero (so A gets no gradient): make every LoRA weight random and non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def copy_lora(src, dst):
    state = peft.get_peft_model_state_dict(src)
    peft.set_peft_model_state_dict(dst, state)
    for name, param in dst.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, dict(src.named_parameters())[name]), name


def lora_grads(peft_model):
    return {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
            if "lora_" in name and param.grad is not None}


class FixedDropoutMask(torch.nn.Module):
    """Stands in for a peft adapter's ``nn.Dropout``: multiplies its input by given ``[T, in]`` multipliers (the
    mask a fused fastft call drew), so peft's own forward becomes the reference for fastft's dropout."""

    def __init__(self, multipliers):
        super().__init__()
        self.multipliers = multipliers

    def forward(self, x):
        return (x.float() * self.multipliers.reshape(x.shape)).to(x.dtype)


def padded_batch(vocab=211, seed=0):
    """3 rows: full, right-padded, left-padded; labels -100 on pads and on a 'prompt' prefix."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 13), generator=gen)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    labels[2, 4] = -100  # would be predicted from a pad position, whose output is arbitrary in HF
    return ids, mask, labels

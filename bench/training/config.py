"""What every contender of ``bench/run.py`` shares: the model shapes, the LoRA settings, the loss
tolerance, and the keys that identify a result row."""
from __future__ import annotations

import math

from fastft.memory.configs import KNOWN_MODELS  # plain data (no transformers import)

CONTENDERS = ("hf", "fastft", "liger", "unsloth")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16
LORA_ALPHA = 16
LORA_SEED = 3407  # FastModel.get_peft_model's default random_state; hf and liger seed the same
CHECKPOINT_RECIPE = "v1"
INIT_STD = 0.02  # transformers' initializer_range for Llama/Qwen2
LOSS_STEPS = 3  # "the first steps" whose losses are compared
LOSS_TOL_FP32 = 1e-3
LOSS_TOL_WHY = (
    "absolute, on each of the first {k} steps, per row: fp32 (CPU smoke) 1e-3 -- correct paths agree to ~1e-6 "
    "there; 16-bit max(0.005, 0.65 / sqrt(tokens per step)). Why: with these random weights (std 0.02) the logits "
    "have std ~1.3, so the per-token loss has std ~1.3 and a kernel that scrambles the hidden states moves the "
    "batch's mean loss by ~sqrt(2) * 1.3 / sqrt(tokens) (0.08 at 512 tokens, 0.014 at 16k): the tolerance is about "
    "half of that. Correct bf16 implementations are expected to differ by a few 1e-3 (first-order rounding "
    "differences average out over the tokens); this is an estimate to be confirmed by the measured diffs, which "
    "every row records (loss_max_abs_diff_vs_hf)."
)


def loss_tolerance(dtype: str | None, tokens: int) -> float:
    if dtype == "float32":
        return LOSS_TOL_FP32
    return max(0.005, 0.65 / math.sqrt(max(1, tokens)))


MODELS = {
    # the published configs of meta-llama/Llama-3.1-8B (llama3 RoPE scaling) and Qwen/Qwen2-7B (q/k/v bias, untied
    # head, RoPE base 1e6), as fastft's memory accounting knows them
    "llama3-8b": KNOWN_MODELS["llama-3.1-8b"],
    "qwen2-7b": KNOWN_MODELS["qwen2-7b"],
    # ~0.5B Llama-shaped model for quick GPU runs
    "small": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # CPU smoke: tiny but the same code paths (GQA 2:1, head_dim 64)
    "tiny": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                           rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-qwen2": ("qwen2", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                 max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 use_sliding_window=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
# --attention (fastft's backend, None for the others) is part of a row's identity, not of its hf baseline
ROW_KEY = ("contender", "model", "seq_len", "batch_size", "loss_path", "checkpointing", "device_kind", "attention")
BASELINE_KEY = tuple(k for k in ROW_KEY if k not in ("contender", "attention"))
# --attention -> FastModel.from_pretrained(attn_implementation=...)
ATTENTION = {"auto": None, "fastft": "fastft", "xformers": "fastft_xformers", "sdpa": "sdpa"}

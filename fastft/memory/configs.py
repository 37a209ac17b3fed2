"""Model configurations fastft knows by name (the published ``config.json`` values), so a "will it fit" question
needs no download (and ``bench/run.py`` builds its random-weight models from them). Any other model: a local
directory or the offline hub cache."""
from __future__ import annotations

import os

_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

KNOWN_MODELS = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   bos_token_id=128000, eos_token_id=128001, rope_parameters=_LLAMA31_ROPE)),
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                    bos_token_id=128000, eos_token_id=128001, rope_parameters=_LLAMA31_ROPE)),
    # Qwen/Qwen2-7B
    "qwen2-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                               rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                               bos_token_id=151643, eos_token_id=151643,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # microsoft/phi-4 (14B): Phi-3's architecture (fused qkv_proj / gate_up_proj), no RoPE scaling, no window
    "phi-4": ("phi3", dict(vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
                           original_max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           sliding_window=None, bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
                           rope_parameters={"rope_type": "default", "rope_theta": 250000.0})),
    # google/gemma-2-9b: head size 256, soft-capped attention (50) and logits (30), 4k sliding window on every other
    # layer, tied 256k-entry head
    "gemma-2-9b": ("gemma2", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                  query_pre_attn_scalar=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                                  sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=1,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # google/gemma-3-12b-it's language model (text_config): 5 of 6 layers local (1k window, RoPE base 10k), global
    # layers RoPE base 1M with linear scaling 8, q/k norms, tied 262k-entry head
    "gemma-3-12b": ("gemma3_text", dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                                        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
                                        head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=131072,
                                        rms_norm_eps=1e-6, sliding_window=1024, hidden_activation="gelu_pytorch_tanh",
                                        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1000000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # Qwen/Qwen3-30B-A3B: 48 layers, each a sparse block of 128 experts (width 768), top-8 renormalised, no shared
    # expert; q/k norms, head size 128
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                        router_aux_loss_coef=0.001, max_position_embeddings=40960,
                                        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                                        sliding_window=None, max_window_layers=48, bos_token_id=151643,
                                        eos_token_id=151645,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen/Qwen1.5-MoE-A2.7B (qwen2_moe): 60 experts (width 1408), top-4 not renormalised, a shared expert (width
    # 5632) behind a sigmoid gate in every layer; q/k/v biases
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                            moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                            num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                                            decoder_sparse_step=1, router_aux_loss_coef=0.001,
                                            max_position_embeddings=8192, rms_norm_eps=1e-6,
                                            tie_word_embeddings=False, use_sliding_window=False,
                                            sliding_window=32768, max_window_layers=21, bos_token_id=151643,
                                            eos_token_id=151643,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts (width 14336), top-2, no sliding window
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=32768,
                                     rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
ALIASES = {"meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
           "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama/llama-3.1-70b": "llama-3.1-70b",
           "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
           "qwen/qwen2-7b": "qwen2-7b",
           "qwen/qwen2-7b-instruct": "qwen2-7b", "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
           "qwen/qwen2.5-1.5b-instruct": "qwen2.5-1.5b", "microsoft/phi-4": "phi-4", "google/gemma-2-9b": "gemma-2-9b",
           "google/gemma-2-9b-it": "gemma-2-9b", "google/gemma-3-12b-it": "gemma-3-12b",
           "google/gemma-3-12b-pt": "gemma-3-12b", "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
           "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b", "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b"}


class UnknownModelError(ValueError):
    pass


def load_config(model):
    """A transformers config for ``model``: a config object (returned as is), a name of
    :data:`KNOWN_MODELS` (or its hub id), a local directory holding ``config.json``, or a hub id already in
    the local cache. Never downloads."""
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    if not isinstance(model, str) or not model:
        raise UnknownModelError(f"model must be a config, a known name or a path, got {model!r}")
    key = ALIASES.get(model.lower(), model.lower())
    if key in KNOWN_MODELS:
        arch, kwargs = KNOWN_MODELS[key]
        return transformers.AutoConfig.for_model(arch, **kwargs)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UnknownModelError(f"{path} has no config.json")
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if model.startswith((".", "/", "~")) or os.sep in model and not _looks_like_hub_id(model):
        raise UnknownModelError(f"no such directory: {model}")
    try:
        return transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    except OSError as exc:
        raise UnknownModelError(
            f"{model!r} is not a known model ({', '.join(KNOWN_MODELS)}), not a local directory, and not in the "
            f"offline Hugging Face cache; download its config.json first (e.g. `huggingface-cli download {model} "
            "config.json`) or pass the directory that holds it") from exc


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)

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
}
ALIASES = {"meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
           "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama/llama-3.1-70b": "llama-3.1-70b",
           "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
           "qwen/qwen2-7b": "qwen2-7b",
           "qwen/qwen2-7b-instruct": "qwen2-7b", "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
           "qwen/qwen2.5-1.5b-instruct": "qwen2.5-1.5b", "microsoft/phi-4": "phi-4"}


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

"""Save a fine-tuned model as a plain 16-bit Hugging Face checkpoint with the LoRA weights merged in.

``model.save_pretrained(dir)`` already writes a standard peft adapter (it loads in plain transformers +
peft, without fastft). This module adds the merged export: every 4-bit base weight is dequantized
(exactly, see ``fastft.dequantize_4bit``), the active adapter's ``scaling * B @ A`` is added in fp32, and
the result is cast to ``dtype`` and saved with the model's config, so no bitsandbytes or peft is needed to
load it.
"""
from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

from .quant import dequantize_4bit


def _merged_linear_weight(module) -> torch.Tensor:
    """fp32 weight of a (possibly LoRA-wrapped, possibly 4-bit) linear layer with its active adapter merged."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = base.weight
    if weight.__class__.__name__ == "Params4bit":
        weight = dequantize_4bit(weight)
    weight = weight.detach().float().clone()
    if hasattr(module, "lora_A") and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
                weight += module.scaling[name] * delta
    return weight


def _linear_layers(causal_lm):
    """(name, module) of every linear layer as a plain checkpoint names it: LoRA-wrapped layers whole, not
    their base_layer / lora_A / lora_B children."""
    for name, module in causal_lm.named_modules():
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        if hasattr(module, "base_layer") or isinstance(module, nn.Linear):
            yield name, module


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """fp32 state dict of the underlying ``*ForCausalLM`` with LoRA merged and 4-bit weights dequantized,
    keyed as a plain transformers checkpoint."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = {}
    for name, module in _linear_layers(causal_lm):
        state[f"{name}.weight"] = _merged_linear_weight(module)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.detach().float()
    for name, param in causal_lm.named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            state.setdefault(name, param.detach().float())
    return state


def save_merged(model, path, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a merged ``dtype`` checkpoint (config + safetensors, and the tokenizer when given) to ``path``."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(causal_lm.config)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {name: tensor.to(dtype) for name, tensor in merged_state_dict(model).items()}
    plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    missing = [name for name, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"merged export is missing weights: {missing[:5]}")
    plain.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)

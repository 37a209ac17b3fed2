"""``FastModel``: load a Llama/Qwen2-family model in 4-bit, patch it with fastft's kernels, wrap it in LoRA.

    model, tokenizer = FastModel.from_pretrained("path/or/hub-id", max_seq_length=2048)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
    # ... then a plain TRL SFTTrainer / DPOTrainer script.
"""
from __future__ import annotations

import logging
import types

import torch
import transformers
from packaging.version import Version

from . import attention as fastft_attention
from . import trl_compat
from .architectures import spec_for
from .loss import make_causal_lm_forward
from .placement import default_device, device_of_map
from .patch import patch_decoder, unpatch_modules

logger = logging.getLogger("fastft")

SUPPORTED_TRANSFORMERS = (Version("5.17"), Version("6"))
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_transformers_version() -> None:
    current = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= current < high:
        raise ImportError(
            f"fastft patches transformers>={low},<{high} (attention/mask interfaces, checkpointing layers); "
            f"found transformers {current}"
        )


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``None``: bf16 on GPUs that have it, fp16 on those that don't (V100, T4), fp32 on CPU. An explicit
    bf16 on a GPU without bf16 is an error, not a silent slowdown."""
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype, dtype)
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if dtype is None:
            return torch.bfloat16 if has_bf16 else torch.float16
        if dtype == torch.bfloat16 and not has_bf16:
            raise ValueError(
                f"{torch.cuda.get_device_name(device)} has no native bfloat16; pass dtype=torch.float16 (or dtype=None)"
            )
    elif dtype is None:
        return torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or None, got {dtype!r}")
    return dtype


def _backbone(model):
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _install_length_check(backbone, max_seq_length: int):
    """A forward pre-hook on the backbone that refuses sequences longer than ``max_seq_length``. Packed
    (padding-free) batches put several sequences in one row: there the longest sequence counts, read off
    ``position_ids`` (what RoPE sees)."""

    def check(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            length = int(position_ids.max()) + 1
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
            cache = kwargs.get("past_key_values")
            if cache is not None:
                length += cache.get_seq_length()
        if length > max_seq_length:
            raise ValueError(
                f"sequence length {length} exceeds max_seq_length={max_seq_length} given to FastModel.from_pretrained; "
                "truncate the data (e.g. SFTConfig(max_length=...)) or load with a larger max_seq_length"
            )

    return backbone.register_forward_pre_hook(check, with_kwargs=True)


class FastModel:
    """Entry points; see the module docstring."""

    @staticmethod
    def from_pretrained(model_name, max_seq_length: int = 2048, load_in_4bit: bool = True, dtype=None,
                        device_map=None, attn_implementation: str | None = None, **kwargs):
        """Load model and tokenizer, patched with fastft's kernels.

        ``load_in_4bit``: bitsandbytes NF4 with double quantization (QLoRA); False loads 16-bit weights
        (``dtype``) served by the same fused kernels. ``attn_implementation=None`` picks fastft's
        attention where its kernel serves the model and GPU, else xformers' (``"fastft_xformers"``, when installed
        and able to run on the GPU), else PyTorch SDPA, with a warning saying which and why.
        Extra ``kwargs`` go to ``from_pretrained`` of transformers (e.g. ``gguf_file``, ``revision``).
        """
        _check_transformers_version()
        config = transformers.AutoConfig.from_pretrained(model_name, **kwargs)
        spec = spec_for(config)
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")

        device = default_device() if device_map is None else device_of_map(device_map)
        if device_map is None:
            device_map = {"": device}
        if device.type == "cuda":
            torch.cuda.set_device(device)  # fastft's Triton kernels launch on the current CUDA device
        dtype = resolve_dtype(dtype, device)
        quantization_config = None
        if load_in_4bit:
            # 4-bit codes stored in the compute dtype (same bytes): FSDP then shards them like any parameter
            # (it leaves integer parameters whole) and its mixed precision, casting to that dtype, keeps them intact.
            quantization_config = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_name, dtype=dtype, quantization_config=quantization_config, device_map=device_map,
            attn_implementation="sdpa", **kwargs,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        patch_model(model, max_seq_length=max_seq_length, attn_implementation=attn_implementation, spec=spec)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0, bias: str = "none",
                       target_modules=DEFAULT_TARGET_MODULES, use_gradient_checkpointing=True,
                       random_state: int = 3407, use_rslora: bool = False, **lora_kwargs):
        """Wrap a patched model in peft LoRA adapters (a standard ``PeftModel``).

        The fused LoRA kernels serve adapters with ``lora_dropout=0``, ``bias="none"``, no DoRA; other
        options are honoured by peft's own forward for the affected layers (slower, still correct).
        ``use_gradient_checkpointing``: True, False, or "offload" (checkpointed hidden states go to pinned
        CPU memory; stays on even when TRL re-enables checkpointing).
        """
        import peft

        if not getattr(model, "_fastft_patched", False):
            raise ValueError("FastModel.get_peft_model expects a model from FastModel.from_pretrained")
        if use_gradient_checkpointing not in (True, False, "offload"):
            raise ValueError(f"use_gradient_checkpointing must be True, False or 'offload', got {use_gradient_checkpointing!r}")
        if lora_dropout or bias != "none" or lora_kwargs.get("use_dora"):
            logger.warning("fastft: lora_dropout > 0, bias != 'none' or DoRA are served by peft's LoRA forward, "
                           "not by fastft's fused kernels (slower)")
        for param in model.parameters():
            param.requires_grad_(False)
        torch.manual_seed(random_state)
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                 target_modules=list(target_modules), use_rslora=use_rslora, task_type="CAUSAL_LM",
                                 **lora_kwargs)
        peft_model = peft.get_peft_model(model, config)
        _set_gradient_checkpointing(model, use_gradient_checkpointing)
        return peft_model


def _set_gradient_checkpointing(model, mode) -> None:
    if mode is False:
        model.activation_checkpointing_disable()
        return
    offload = mode == "offload"
    if offload and model.device.type == "cpu":
        # the activations are in host memory already
        logger.warning("fastft: use_gradient_checkpointing='offload' on a CPU model is plain checkpointing")
        offload = False
    if offload:
        # Trainers re-enable checkpointing with their own arguments (TRL does after each reference pass);
        # keep offloading on through those calls.
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, **_):
            self._activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload=True)

        model.gradient_checkpointing_enable = types.MethodType(gradient_checkpointing_enable, model)
    model.activation_checkpointing_enable(offload=offload)
    model.enable_input_require_grads()


def patch_model(model, max_seq_length: int = 2048, attn_implementation: str | None = None, spec=None):
    """Patch a loaded ``*ForCausalLM`` instance in place (see ``patch.py``); returns it."""
    spec = spec or spec_for(model.config)
    fastft_attention.register()
    trl_compat.install()
    attn_implementation = fastft_attention.resolve_attention(model.config, model.device, model.dtype,
                                                             attn_implementation)
    model.set_attn_implementation(attn_implementation)

    patch_decoder(model.model, spec)
    for module in model.modules():
        # bitsandbytes' CPU backend would repack 4-bit weights into a CPU-only layout on the first eval-mode
        # forward of a layer that falls back to it; fastft reads the standard layout, so keep it.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.forward = types.MethodType(make_causal_lm_forward(model), model)
    model._fastft_lm_head_hook = trl_compat.tag_lm_head(model)
    model._fastft_length_hook = _install_length_check(model.model, max_seq_length)
    model._fastft_patched = True
    model.max_seq_length = max_seq_length
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: the model computes with transformers' own modules again."""
    model = _causal_lm(model)
    unpatch_modules(model.model)
    model.__dict__.pop("forward", None)
    model._fastft_length_hook.remove()
    model._fastft_lm_head_hook.remove()
    model._fastft_patched = False
    model.set_attn_implementation("sdpa")
    return model

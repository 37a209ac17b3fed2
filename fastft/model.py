"""``FastModel``: load a Llama/Qwen2-family model in 4-bit, patch it with fastft's kernels, wrap it in LoRA.

    model, tokenizer = FastModel.from_pretrained("path/or/hub-id", max_seq_length=2048)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
    # ... then a plain TRL SFTTrainer / DPOTrainer script.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import types
import warnings

import torch
import transformers

from . import attention as fastft_attention
from . import master_weights, moe, reach_ins, trl_compat, versions
from .architectures import spec_for
from .kernels._common import DISABLE_ENV, env_disabled_kernels, kernel_names
from .loss import make_causal_lm_forward
from .patch import describe_routes, patch_decoder, unpatch_modules
from .placement import default_device, device_of_map

logger = logging.getLogger("fastft")


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


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _install_length_check(backbone, max_seq_length: int):
    """A forward pre-hook on the backbone that refuses sequences longer than ``max_seq_length``. Packed
    (padding-free) batches put several sequences in one row: there the largest position counts (what RoPE sees),
    read together with the packing metadata the attention needs (one sync). Without position_ids (and without
    a cache) the hook passes the backbone the ``arange`` it would make, marked as unpacked."""

    def check(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids if ids is not None else kwargs["inputs_embeds"]
        position_ids = kwargs.get("position_ids")
        cache = kwargs.get("past_key_values")
        if position_ids is not None:
            # the one sync of a packed batch: its packing metadata (memoised for the attention) and largest position
            length = fastft_attention.batch_packing(position_ids, tokens.shape[0]).largest_position + 1
        else:
            length = tokens.shape[1]
            if cache is not None:
                length += cache.get_seq_length()
            elif kwargs.get("cache_position") is None and len(args) < 3:  # (position_ids is forward's third)
                # the position_ids the backbone would make, known to hold one sequence per row: the attention
                # need not read them back to find out
                kwargs["position_ids"] = fastft_attention.plain_position_ids(tokens.shape[0], length, tokens.device)
        if length > max_seq_length:
            raise ValueError(
                f"sequence length {length} exceeds max_seq_length={max_seq_length} given to FastModel.from_pretrained; "
                "truncate the data (e.g. SFTConfig(max_length=...)) or load with a larger max_seq_length"
            )
        return args, kwargs

    return backbone.register_forward_pre_hook(check, with_kwargs=True)


def _local_path_or_hub_id(model_name) -> str:
    """``model_name`` as transformers should get it: an existing local path (``~`` expanded) or a hub id. A
    name that can only be a local path (``./x``, ``../x``, ``~/x``, ``/x``, ``a/b/c``: hub ids are ``name`` or
    ``owner/name`` and never start with ``.``) but does not exist is an error now, not a hub lookup that
    retries the network and then complains about repo ids. A file (the model's ``config.json``, say) is an error
    that names its directory, not a tokenizer error later."""
    if isinstance(model_name, os.PathLike):
        model_name, only_local = os.fspath(model_name), True
    elif isinstance(model_name, str) and model_name:
        only_local = (model_name.startswith((".", "~")) or os.path.isabs(model_name)
                      or model_name.count("/") > 1 or "\\" in model_name)
    else:
        raise TypeError(f"model_name must be a local directory or a Hugging Face hub id, got {model_name!r}")
    path = os.path.expanduser(model_name)
    if os.path.isfile(path):  # e.g. the config.json or a weights file inside the model's directory
        directory, name = os.path.split(path)
        directory = directory or "."
        hint = (f"; for a GGUF file: FastModel.from_pretrained({directory!r}, gguf_file={name!r})"
                if name.endswith(".gguf") else "")
        raise NotADirectoryError(f"model path {model_name!r} is a file; FastModel.from_pretrained takes the model's "
                                 f"directory (config.json, weights and tokenizer files): pass {directory!r}{hint}")
    if os.path.exists(path):
        return path
    if only_local:
        raise FileNotFoundError(f"model path {model_name!r} does not exist (looked at {os.path.abspath(path)}); "
                                "pass an existing model directory or a hub id such as 'Qwen/Qwen2.5-0.5B'")
    return model_name


def _warn_beyond_trained_positions(config, max_seq_length: int) -> None:
    trained = getattr(config, "max_position_embeddings", None)
    if trained is not None and max_seq_length > trained:
        warnings.warn(
            f"fastft: max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={trained}; "
            "positions past it are outside the RoPE range the model was trained on and quality degrades. "
            f"Use max_seq_length <= {trained}, or a model (or rope_parameters scaling) made for longer contexts",
            stacklevel=3,
        )


def _load_tokenizer(model_name: str, **kwargs):
    fix = ("FastModel.from_pretrained loads the tokenizer from the model's directory (or hub repo): save it there "
           "with tokenizer.save_pretrained(path)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"fastft: could not load a tokenizer from {model_name!r} ({error}).\n{fix}") from error
    # Without tokenizer files transformers may build an empty tokenizer (Qwen2's does) instead of failing.
    folder = os.path.join(model_name, kwargs.get("subfolder") or "")
    if os.path.isdir(folder) and "gguf_file" not in kwargs:  # (a GGUF file carries its tokenizer)
        files = {"tokenizer.json", *type(tokenizer).vocab_files_names.values()}
        if not any(os.path.isfile(os.path.join(folder, file)) for file in files):
            raise ValueError(f"fastft: could not load a tokenizer from {model_name!r}: it holds none of "
                             f"{sorted(files)} (transformers made an empty {type(tokenizer).__name__}).\n{fix}")
    return tokenizer


class FastModel:
    """Entry points; see the module docstring."""

    @staticmethod
    def from_pretrained(model_name, max_seq_length: int = 2048, load_in_4bit: bool = True, dtype=None,
                        device_map=None, attn_implementation: str | None = None, disable_kernels=None, **kwargs):
        """Load model and tokenizer, patched with fastft's kernels.

        ``load_in_4bit``: bitsandbytes NF4 with double quantization (QLoRA); False loads 16-bit weights
        (``dtype``) served by the same fused kernels. ``attn_implementation=None`` picks fastft's
        attention where its kernel serves the model and GPU, else xformers' (``"fastft_xformers"``, when installed
        and able to run on the GPU), else PyTorch SDPA, with a warning saying which and why.

        ``disable_kernels``: kernel names (``fastft.kernels.KERNEL_NAMES``, or the groups ``"lora"`` and ``"all"``;
        a list or a comma-separated string) whose ops run the plain transformers / peft / SDPA path instead, e.g.
        ``["attention", "lora_mlp"]`` when ``fastft-doctor`` reports those kernels failing on your GPU. The
        names disabled for this model are these together with those of the ``FASTFT_DISABLE_KERNELS``
        environment variable at load time (the union; one log line says where each op runs). ``"all"`` gives
        the plain transformers + peft model. An unknown name is a ValueError. The environment variable is also
        read at every kernel call, so setting it later still moves any kernel to its PyTorch engine.

        Extra ``kwargs`` go to ``from_pretrained`` of transformers (e.g. ``gguf_file``, ``revision``).
        """
        versions.check_installed()
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
        _disabled_for_model(disable_kernels)  # a wrong name (argument or environment) fails before the weights load
        model_name = _local_path_or_hub_id(model_name)
        config = transformers.AutoConfig.from_pretrained(model_name, **kwargs)
        spec = spec_for(config)
        _warn_beyond_trained_positions(config, max_seq_length)
        # the tokenizer first: a missing one should fail before minutes of weight loading, not after
        tokenizer = _load_tokenizer(model_name, **kwargs)

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
        # mixture-of-experts: bitsandbytes quantizes nn.Linear only; fastft quantizes the experts as they load
        quantizing_experts = (moe.experts_quantized_while_loading(config.model_type) if load_in_4bit and spec.moe
                              else contextlib.nullcontext())
        with quantizing_experts:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_name, dtype=dtype, quantization_config=quantization_config, device_map=device_map,
                attn_implementation=spec.load_attention, **kwargs,
            )
        if spec.moe:
            moe.finish_loading(model, load_in_4bit)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        patch_model(model, max_seq_length=max_seq_length, attn_implementation=attn_implementation, spec=spec,
                    disable_kernels=disable_kernels)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0, bias: str = "none",
                       target_modules=None, use_gradient_checkpointing=True,
                       random_state: int = 3407, use_rslora: bool = False, memory_budget_gb: float | None = None,
                       batch_size: int = 1, mlp_chunk_tokens: int | None = None, **lora_kwargs):
        """Wrap a patched model in peft LoRA adapters (a standard ``PeftModel``).

        ``target_modules=None`` puts an adapter on every linear layer of the decoder: q/k/v/o and gate/up/down
        (Phi-3: its fused ``qkv_proj``, ``o_proj``, its fused ``gate_up_proj``, ``down_proj``).

        The fused LoRA kernels serve adapters with ``bias="none"``, no DoRA, with or without
        ``lora_dropout`` (its mask drawn inside the kernels, see ``kernels/lora_dropout.py``); other
        options are honoured by peft's own forward for the affected layers (slower, still correct).

        ``use_gradient_checkpointing`` (see ``fastft/checkpointing.py``; kept when TRL re-enables
        checkpointing): True (every layer), False, a number of layers (the first ones), "offload" (every
        layer, checkpoints in pinned host memory), or "auto": as little as fits ``memory_budget_gb`` GiB
        (default: what the GPU has for this process) for ``batch_size`` sequences of ``max_seq_length``
        tokens per step, decided by fastft's memory accounting (logged). ``mlp_chunk_tokens``: run the MLP
        that many tokens at a time (bounded memory for long sequences; recomputes gate/up in the backward).
        """
        import peft

        from . import checkpointing

        if not getattr(model, "_fastft_patched", False):
            raise ValueError("FastModel.get_peft_model expects a model from FastModel.from_pretrained")
        # Every argument is checked before the model changes: a refused call leaves it as it was.
        # target_modules=None: the architecture's linear layers; mixture-of-experts models: attention and the experts
        target_modules, lora_kwargs = moe.lora_targets(model, target_modules, lora_dropout, lora_kwargs)
        moe.check_training_options(model, mlp_chunk_tokens)
        if target_modules is None:
            target_modules = spec_for(model.config).linear_layers
        target_modules = _check_lora_args(model, r, lora_alpha, target_modules)  # first: refuses a PeftModel
        mode = checkpointing.check_settings(model, use_gradient_checkpointing, memory_budget_gb=memory_budget_gb,
                                            mlp_chunk_tokens=mlp_chunk_tokens, batch_size=batch_size)
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                 target_modules=target_modules, use_rslora=use_rslora, task_type="CAUSAL_LM",
                                 **lora_kwargs)
        if bias != "none" or lora_kwargs.get("use_dora"):
            logger.warning("fastft: bias != 'none' or DoRA are served by peft's LoRA forward, "
                           "not by fastft's fused kernels (slower)")
        trainable = {name: param.requires_grad for name, param in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(False)
        torch.manual_seed(random_state)
        with _adapters_removed_on_error(model, trainable):  # peft's injection can fail part-way
            peft_model = peft.get_peft_model(model, config)
        # peft makes fp32 adapters: bf16 in a bf16 model (the fused path reads them as they are; TRL casts them
        # so too), fp32 master weights in an fp16 one (fp16 updates underflow; the fused path reads fp16 copies)
        master_weights.set_trainable_dtypes(peft_model, model.dtype)
        # planned as the GPU step: a CPU model in fp32 stands for its bf16 training on a GPU
        plan_dtype = model.dtype if model.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        targeted = sorted({name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules()  # also for
                           if isinstance(module, peft.tuners.lora.LoraLayer)  # "all-linear" / a regex; expert
                           and not isinstance(module, peft.tuners.lora.ParamWrapper)})  # tensors: their own list
        lora_settings = dict(r=r, lora_alpha=lora_alpha, target_modules=tuple(targeted), dtype=plan_dtype,
                             target_parameters=tuple(config.target_parameters or ()))
        with _adapters_removed_on_error(model, trainable):  # the memory plan's accounting can still fail
            checkpointing.apply_mode(model, mode, max_seq_length=model.max_seq_length, batch_size=batch_size,
                                     memory_budget_gb=memory_budget_gb, mlp_chunk_tokens=mlp_chunk_tokens,
                                     lora_settings=lora_settings)
        return peft_model


@contextlib.contextmanager
def _adapters_removed_on_error(model, trainable: dict):
    """On an error, undo ``get_peft_model``'s changes to ``model``, so that a corrected call is not refused as a
    second one: each LoRA layer replaced by its base layer (what peft's ``unload()`` does, here also after an
    injection that failed part-way), peft's config removed, ``requires_grad`` of each parameter as in
    ``trainable``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        yield
    except BaseException:
        for name, module in list(model.named_modules()):
            parent, _, child = name.rpartition(".")
            # a tuner layer inside another (peft nests one per expert tensor) went with the outer one
            if isinstance(module, BaseTunerLayer) and getattr(model.get_submodule(parent), child, None) is module:
                setattr(model.get_submodule(parent), child, module.get_base_layer())
        model.__dict__.pop("peft_config", None)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        raise


def _check_lora_args(model, r, lora_alpha, target_modules):
    """Refuse LoRA arguments that would fail obscurely inside peft or train silently wrong; returns
    ``target_modules`` in the form peft takes (a string stays a string: "all-linear" or a regex)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "FastModel.get_peft_model: the model already has LoRA adapters (it is the result of an earlier "
            "get_peft_model call); wrapping it again would nest one PeftModel in another. Call it once per "
            "loaded model; for a second adapter use model.add_adapter(name, peft.LoraConfig(...)) and "
            "model.set_adapter(name)"
        )
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r (the LoRA rank) must be a positive int such as 16, got {r!r}")
    if r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive int such as 16, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise TypeError(f"lora_alpha must be a finite number such as 16, got {lora_alpha!r}")
    if lora_alpha == 0:
        raise ValueError(
            "lora_alpha=0 scales every LoRA update by lora_alpha / r = 0: the adapter adds nothing and every LoRA "
            "gradient is exactly zero, so training would change nothing; pass e.g. lora_alpha=r or 2 * r"
        )
    if isinstance(target_modules, str):
        return target_modules  # peft's own forms: "all-linear", or a regex matched against full module names
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or not all(
            isinstance(name, str) for name in target_modules):
        raise TypeError(f"target_modules must be a list of module names, 'all-linear' or a regex string, "
                        f"got {target_modules!r}")
    # peft's rule for a list: a module is targeted when its full name equals an entry or ends with "." + entry;
    # an entry that matches nothing is otherwise silently ignored (a typo leaves that layer untrained).
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"target_modules {unmatched} match no module of the model; its linear layers are named "
                         f"{linear} (a regex string or 'all-linear' also works)")
    return list(target_modules)


def _disabled_for_model(disable_kernels) -> tuple[frozenset[str], str | None]:
    """The kernel names disabled for a model (``disable_kernels`` and ``FASTFT_DISABLE_KERNELS``, united) and the
    sources that named them, for the log line (None when nothing is disabled)."""
    from_argument = kernel_names(disable_kernels, "disable_kernels")
    from_env = env_disabled_kernels()
    sources = []
    if from_env:
        sources.append(f"{DISABLE_ENV}={os.environ[DISABLE_ENV].strip()}")
    if from_argument:
        sources.append(f"disable_kernels={disable_kernels!r}")
    return from_argument | from_env, "; ".join(sources) or None


def patch_model(model, max_seq_length: int = 2048, attn_implementation: str | None = None, spec=None,
                disable_kernels=None):
    """Patch a loaded ``*ForCausalLM`` instance in place (see ``patch.py``); returns it. ``disable_kernels``: as
    in :meth:`FastModel.from_pretrained` (united with ``FASTFT_DISABLE_KERNELS``)."""
    spec = spec or spec_for(model.config)
    disabled, source = _disabled_for_model(disable_kernels)
    fastft_attention.register()
    trl_compat.install()
    attn_implementation = fastft_attention.resolve_attention(model.config, model.device, model.dtype,
                                                             attn_implementation, disabled="attention" in disabled)
    model.set_attn_implementation(attn_implementation)
    if source is not None:
        logger.warning(describe_routes(disabled, source))

    patch_decoder(model.model, spec, disabled)
    # bitsandbytes' CPU backend would repack 4-bit weights into a CPU-only layout on the first eval-mode
    # forward of a layer that falls back to it; fastft reads the standard layout, so keep it.
    if reach_ins.available(reach_ins.CPU_REPACKING):
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if not {"cross_entropy", "fused_linear_cross_entropy"} <= disabled:
        model.forward = types.MethodType(make_causal_lm_forward(model, disabled), model)
    model._fastft_lm_head_hook = trl_compat.tag_lm_head(model, serve="linear_log_probs" not in disabled)
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
    model.set_attn_implementation(spec_for(model.config).load_attention)
    return model

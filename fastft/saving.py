"""Save a fine-tuned model with the LoRA weights merged in: a plain 16-bit Hugging Face checkpoint, or a GGUF file.

``model.save_pretrained(dir)`` already writes a standard peft adapter (it loads in plain transformers +
peft, without fastft). This module adds the merged export, built so that it fits wherever training fit:

* :func:`iter_merged_tensors` yields the merged checkpoint one tensor at a time. Each 4-bit base weight is
  dequantized (exactly, see ``fastft.dequantize_4bit``), the active adapters' ``scaling * B @ A`` is added in
  fp32, and the result is cast to ``dtype``, on ``device`` (the CPU unless asked): about one layer's fp32
  weight exists at a time, never the whole model.
* :func:`save_merged` writes those tensors into safetensors shards of at most ``max_shard_size`` as each
  fills, then ``model.safetensors.index.json`` (when there are several shards), the config (quantization
  removed) and the tokenizer, all into a temporary directory beside ``path`` that is renamed to ``path`` only
  once complete: a failure (a full disk, say) leaves no half checkpoint. Peak extra memory: about one layer
  in fp32 plus one shard, in CPU memory. The result loads with ``AutoModelForCausalLM.from_pretrained`` and
  needs neither bitsandbytes nor peft.
* :func:`save_gguf` writes them, with the tokenizer, into one GGUF file for llama.cpp, Ollama and LM Studio, as
  llama.cpp's own converter would (``fastft.gguf_export`` holds llama.cpp's conventions), streamed the same way.
"""
from __future__ import annotations

import copy
import functools
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from transformers.utils.hub import convert_file_size_to_int

from . import gguf_export
from .architectures import spec_for
from .moe import EXPERT_PARAMETERS, checkpoint_expert_tensors, is_moe_config, merged_experts_plan
from .quant import _is_params4bit, dequantize_4bit, nf4_weight_of

logger = logging.getLogger("fastft")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _export_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32 (or a name such as "
                         f"'bfloat16'), got {dtype!r}")
    return dtype


def _export_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_lora_layers(causal_lm) -> None:
    """Refuse adapters this export cannot merge."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in causal_lm.named_modules() if isinstance(module, LoraLayer)}
    for name, layer in layers.items():
        for adapter in _merging_adapters(layer):
            if adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(f"fastft cannot merge adapter {adapter!r} of {name}: it is a LoRA variant "
                                 "(e.g. DoRA); merge it with peft on a 16-bit model instead")
            if adapter not in layer.lora_A:
                raise ValueError(f"fastft merges LoRA into linear layers only; {name} holds adapter "
                                 f"{adapter!r} of another kind (e.g. an embedding LoRA)")
    head = causal_lm.get_output_embeddings()
    if getattr(causal_lm.config, "tie_word_embeddings", False) and any(
            layer is head and _merging_adapters(layer) for layer in layers.values()):
        raise ValueError("fastft cannot merge a LoRA on an lm_head tied to the input embeddings: the merged "
                         "head would no longer equal them")


def _merging_adapters(layer) -> list[str]:
    # a disabled or already merged layer contributes its base weight only
    if layer.disable_adapters or layer.merged:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A or name in layer.lora_embedding_A]


def _float_weight(param, device: torch.device) -> torch.Tensor:
    """A new fp32 tensor on ``device`` with the values of ``param`` (4-bit NF4 weights dequantized)."""
    if _is_params4bit(param):
        return dequantize_4bit(param).to(device=device, dtype=torch.float32)  # dequantized on the weight's device
    return param.detach().to(device=device, dtype=torch.float32, copy=True)


def _merged_param(layer, kind: str, device: torch.device) -> torch.Tensor:
    """fp32 ``weight`` or ``bias`` of a LoRA layer with its active adapters merged in:
    ``W + s * B @ A`` and, with ``lora_bias``, ``b + s * B.bias``."""
    merged = _float_weight(getattr(layer.get_base_layer(), kind), device)
    for adapter in _merging_adapters(layer):
        A, B, s = layer.lora_A[adapter], layer.lora_B[adapter], layer.scaling[adapter]
        if kind == "weight":
            merged.addmm_(B.weight.detach().to(device, torch.float32), A.weight.detach().to(device, torch.float32),
                          alpha=s)  # in place: no [out, in] temporary
        elif B.bias is not None:
            merged.add_(B.bias.detach().to(device, torch.float32), alpha=s)
    return merged


def iter_merged_tensors(model, dtype=torch.bfloat16, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The merged plain checkpoint of ``model``, one tensor at a time.

    Args:
        model: a fastft model, with LoRA (a ``PeftModel``) or without.
        dtype: ``torch.bfloat16`` / ``float16`` / ``float32`` or its name (``"bfloat16"``, ...).
        device: where dequantization results are merged and the tensors are yielded (default the CPU; a 4-bit
            weight is dequantized on its own device first).

    Yields:
        ``(name, tensor)`` in the model's parameter order, named as a plain transformers checkpoint (no
        ``base_model.model.`` prefix, no ``base_layer``, a ``modules_to_save`` module such as ``lm_head`` or
        ``embed_tokens`` as its trained copy under its own name), each tensor new (not sharing memory with the
        model) and in ``dtype``. A head tied to the input embeddings is not repeated (one trained apart from
        them is). Merging is exact in fp32 before the final cast:
        ``W = dequant(W4) + sum over active adapters of scaling * B @ A``. Mixture-of-experts models (Qwen3-MoE,
        Qwen2-MoE, Mixtral): each expert's ``W[e] = dequant(W4[e]) + scaling * B[e] @ A[e]`` (peft's
        ``target_parameters`` LoRA), one tensor per expert and projection as the architecture's checkpoints
        (and transformers' ``save_pretrained``) have them, e.g. ``model.layers.0.mlp.experts.3.gate_proj.weight``
        or Mixtral's ``model.layers.0.block_sparse_moe.experts.3.w1.weight``; routers as they are.

    Arguments and adapters are checked when this is called (DoRA and embedding LoRAs are refused); the merge
    runs lazily, as the tensors are taken.
    """
    dtype, device = _export_dtype(dtype), _export_device(device)
    causal_lm = _causal_lm(model)
    plan = _merge_plan(causal_lm, device)
    moe = spec_for(causal_lm.config).moe if is_moe_config(causal_lm.config) else None
    if moe is None:
        # one expression per tensor: the fp32 merge result is freed as soon as the cast exists
        return ((name, merge().to(dtype)) for name, _, merge in plan)
    return (pair for name, _, merge in plan
            for pair in checkpoint_expert_tensors(moe, name, merge().to(dtype)))


def _logical_shape(param) -> tuple[int, ...]:
    """The shape of a parameter's values (a 4-bit weight's ``[out, in]``, not its packed bytes')."""
    return tuple(nf4_weight_of(param).shape) if _is_params4bit(param) else tuple(param.shape)


def _trained_module(wrapper, name: str) -> torch.nn.Module:
    """The module a peft ``modules_to_save`` wrapper computes with, as its forward picks it: the active adapter's
    trained copy, or the original module when adapters are disabled or the active adapter has no copy here."""
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(wrapper, ModulesToSaveWrapper):
        raise ValueError(f"fastft cannot export {name}: it is wrapped by peft's {type(wrapper).__name__} (e.g. "
                         "trainable_token_indices); merge it with peft (model.merge_and_unload()) on a 16-bit model, "
                         "or train the whole module with modules_to_save instead")
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(adapter not in wrapper.modules_to_save for adapter in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _export_parameters(causal_lm) -> list:
    """``(name, parameter, LoRA layer or None)`` for every tensor of the merged checkpoint, in the model's parameter
    order, under plain transformers names: a LoRA layer's base weight and bias under the layer's name (the layer
    merges its adapters into them), a ``modules_to_save`` module's trained copy (:func:`_trained_module`) under the
    module's own name. A parameter reached twice (a head tied to the embeddings) is yielded once, first name first."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    seen: set[int] = set()

    def walk(module, prefix):
        if isinstance(module, AuxiliaryTrainingWrapper):
            module = _trained_module(module, prefix.rstrip("."))
        layer = module if isinstance(module, LoraLayer) else None
        owner = module.get_base_layer() if layer is not None else module
        for name, param in owner.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + name, param, layer
        if layer is None:
            for name, child in module.named_children():
                yield from walk(child, f"{prefix}{name}.")

    return list(walk(causal_lm, ""))


def _unties_head(causal_lm, names) -> bool:
    """Whether an export with tensors ``names`` unties a head the config ties to the input embeddings: training
    made them two tensors (only one of the pair in ``modules_to_save``, or peft's ``ensure_weight_tying=False``),
    so the export holds both and must say so, or the loader would tie them again."""
    return getattr(causal_lm.config, "tie_word_embeddings", False) and "lm_head.weight" in names


def _merge_plan(causal_lm, device: torch.device) -> list:
    """``(name, shape, merge)`` for each tensor of the merged checkpoint, in parameter order: ``merge()`` computes
    its fp32 value. The adapters are checked now; nothing is dequantized or merged until ``merge`` is called, so an
    exporter can lay out a file from the names and shapes first (GGUF puts its tensor table before the data)."""
    _check_lora_layers(causal_lm)
    plan = []
    for name, param, layer in _export_parameters(causal_lm):
        prefix, _, param_name = name.rpartition(".")
        if param_name in EXPERT_PARAMETERS and prefix.endswith("experts"):
            # a 3-D expert tensor (both come once per experts module, maybe wrapped by peft's ParamWrapper)
            if param_name == EXPERT_PARAMETERS[0]:
                plan.extend(merged_experts_plan(causal_lm.get_submodule(prefix), prefix, device))
            continue
        if layer is not None:
            merge = functools.partial(_merged_param, layer, param_name, device)
        else:
            merge = functools.partial(_float_weight, param, device)
        plan.append((name, _logical_shape(param), merge))
    if _unties_head(causal_lm, [name for name, _, _ in plan]):
        logger.warning("fastft: this model ties lm_head to embed_tokens, but training made them two tensors (one "
                       "of the pair in modules_to_save without the other, or both without peft's "
                       "ensure_weight_tying=True); the export holds both, untied, as trained")
    return plan


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_merged writes a directory, but {str(path)!r} is a file; pass a directory path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists and is not empty; pass another path, or overwrite=True to "
                                  "replace the checkpoint there")
        if not (path / "config.json").is_file():
            raise FileExistsError(f"overwrite=True replaces a previous checkpoint (a directory with config.json), "
                                  f"but {str(path)!r} holds something else; pass another path")


def _write_shards(tensors, directory: Path, shard_limit: int) -> None:
    """Write ``(name, tensor)`` pairs into safetensors shards of at most ``shard_limit`` bytes (a bigger tensor
    gets a shard of its own), each written as soon as the next tensor would not fit; then the index."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush():
        file = directory / f"shard-{len(shards):05d}.safetensors"  # numbered "-of-N" once N is known
        safetensors.torch.save_file(shard, file, metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > shard_limit:
            flush()
            shard_bytes = 0
        shard[name] = tensor.to("cpu")
        shard_bytes += size
        total += size
    if shard:
        flush()

    if len(shards) == 1:
        (directory / "shard-00000.safetensors").rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / f"shard-{i:05d}.safetensors").rename(directory / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plain_config(causal_lm, dtype: torch.dtype):
    config = copy.deepcopy(causal_lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = str(dtype).removeprefix("torch.")
    if _unties_head(causal_lm, [name for name, _, _ in _export_parameters(causal_lm)]):
        config.tie_word_embeddings = False
    config.architectures = [type(causal_lm).__name__]
    return config


def _partial_path(path: Path) -> Path:
    """A new hidden name beside ``path`` for an export in progress, naming its writer (host and process id) so that
    a later export can tell a killed writer's leftover from a running export's (see :func:`_remove_stale_partials`)."""
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_partials(path: Path) -> None:
    """Remove what exports to ``path`` that were killed (SIGKILL, a lost machine) left beside it: the partial files
    or directories whose writer, on this host, is no longer running. A partial of a running export, another host's
    or one without a writer in its name (older fastft) is left, and named in a warning."""
    prefix = f".{path.name}.partial-"
    host = socket.gethostname()
    for leftover in sorted(path.parent.glob(glob.escape(prefix) + "*")):
        writer = leftover.name[len(prefix):].rsplit("-", 2)
        if (os.name == "posix" and len(writer) == 3 and writer[0] == host and writer[1].isdigit()
                and not _process_alive(int(writer[1]))):
            logger.warning(f"fastft: removing {str(leftover)!r}, left by an export to {str(path)!r} that did not "
                           "finish (its process is gone)")
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        else:
            logger.warning(f"fastft: {str(leftover)!r} is an unfinished export to {str(path)!r}, by another process "
                           "that may still be running; remove it once no export to that path runs")


def _move_into_place(finished: Path, path: Path) -> None:
    """Rename the finished checkpoint directory to ``path``, replacing what ``_check_destination`` allowed
    (an empty directory, or a previous checkpoint under overwrite=True) only once the new one is complete."""
    if not path.exists():
        finished.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    path.rename(old / "previous")
    try:
        finished.rename(path)
    except BaseException:
        (old / "previous").rename(path)  # put the previous checkpoint back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def save_merged(model, path, tokenizer=None, dtype=torch.bfloat16, *, device="cpu", max_shard_size="5GB",
                overwrite: bool = False) -> None:
    """Write ``model`` with its LoRA merged as a plain transformers checkpoint in ``dtype`` to the directory ``path``.

    Args:
        model: a fastft model (a ``PeftModel`` from ``FastModel.get_peft_model``, or a model without LoRA).
        path: the checkpoint directory to create. It must not exist, or be an empty directory; a previous
            checkpoint there (a directory with ``config.json``) is replaced only with ``overwrite=True``.
        tokenizer: saved beside the weights when given.
        dtype: ``torch.bfloat16`` (default), ``torch.float16``, ``torch.float32``, or its name.
        device: where the merge runs (default the CPU; see :func:`iter_merged_tensors`).
        max_shard_size: largest safetensors file, in bytes or as ``"5GB"`` / ``"500MB"`` (transformers' rule).
        overwrite: replace a previous checkpoint at ``path``.

    The destination and the arguments are checked before anything is merged. Files go to a temporary
    directory beside ``path`` that becomes ``path`` only when complete; on any error it is removed and an
    existing checkpoint at ``path`` stays as it was.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    _check_destination(path, overwrite)
    dtype = _export_dtype(dtype)
    try:
        shard_limit = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError) as error:
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB', got "
                         f"{max_shard_size!r}") from error
    tensors = iter_merged_tensors(model, dtype, device)  # checks dtype, device and adapters; merges lazily
    causal_lm = _causal_lm(model)

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    partial = _partial_path(path)
    partial.mkdir()  # mode 0o777 less the umask, as save_pretrained's directories (mkdtemp's would be 0o700)
    try:
        _write_shards(tensors, partial, shard_limit)
        _plain_config(causal_lm, dtype).save_pretrained(partial)
        if causal_lm.can_generate() and causal_lm.generation_config is not None:
            causal_lm.generation_config.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        _move_into_place(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename


def check_gguf_destination(path, overwrite: bool = False) -> Path:
    """The checks :func:`save_gguf` makes of its destination ``path`` (returned as a ``Path``, ``~`` expanded): a
    script that exports after hours of training calls it first, so that a bad path fails before the training."""
    text = os.fspath(path)
    path = Path(os.path.expanduser(text))
    if path.is_dir() or text.endswith(tuple(filter(None, ("/", os.sep, os.altsep)))):
        named = "is a directory" if path.is_dir() else "ends with a path separator, so it names a directory"
        raise FileExistsError(f"save_gguf writes one file, but {text!r} {named}; pass a file path such as "
                              f"{str(path / 'model.gguf')!r}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass another path, or overwrite=True to replace it")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FileExistsError(f"overwrite=True replaces a GGUF file, but {str(path)!r} holds something else; "
                                      "pass another path")
    existing = next(parent for parent in path.absolute().parents if parent.exists())  # "/" at the latest
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {str(path)!r}: no permission to write in {str(existing)!r}")
    return path


def save_gguf(model, path, tokenizer, quantization: str = "f16", *, device="cpu", overwrite: bool = False) -> None:
    """Write ``model`` with its LoRA merged, and its tokenizer, as one GGUF file for llama.cpp, Ollama or LM Studio.

    Args:
        model: a fastft model (a ``PeftModel`` from ``FastModel.get_peft_model``, or a model without LoRA) of an
            architecture fastft patches: Llama (Llama 3.1 RoPE scaling included), Mistral, Qwen2, Qwen3, Phi-3, and
            the mixture-of-experts Qwen3-MoE, Qwen2-MoE and Mixtral (llama.cpp's stacked expert tensors; see
            ``fastft.gguf_export``).
        path: the ``.gguf`` file to create. An existing GGUF file there is replaced only with ``overwrite=True``.
        tokenizer: the model's (fast) tokenizer: its vocabulary, merges, special tokens and chat template go into
            the file, so that llama.cpp tokenizes as it does (see :func:`fastft.gguf_export.add_tokenizer`).
        quantization: ``"f32"``, ``"f16"`` (default), ``"bf16"``, ``"q8_0"``, or whatever else the installed
            ``gguf`` package can quantize (``q5_1``, ``q5_0``, ``q4_1``, ``q4_0`` with gguf 0.19), any case. Norms,
            biases and other 1-D tensors stay F32; see :func:`fastft.gguf_export.tensor_type` for llama.cpp's rules.
        device: where the merge runs (default the CPU; see :func:`iter_merged_tensors`).
        overwrite: replace a previous GGUF file at ``path``.

    The file is what llama.cpp's ``convert_hf_to_gguf.py`` (and, for q4/q5 types, ``llama-quantize``) writes for the
    merged model; no llama.cpp build is needed. The arguments, the destination, the architecture and the tokenizer
    are checked before anything is merged. The tensor table is laid out from the tensors' shapes, then each tensor
    is merged, converted and written before the next: peak extra memory is about the largest tensor in fp32 plus its
    converted copy, not the model. It is written to a temporary file beside ``path`` that is renamed to ``path``
    when complete, so a failure leaves no partial file and a previous one untouched.
    """
    if tokenizer is None:
        raise ValueError("save_gguf needs the model's tokenizer: llama.cpp reads the vocabulary, special tokens and "
                         "chat template from the GGUF file")
    path = check_gguf_destination(path, overwrite)
    gguf_export.quantization(quantization)
    device = _export_device(device)
    causal_lm = _causal_lm(model)
    plan = _merge_plan(causal_lm, device)  # names and shapes; nothing merged yet
    name = Path(causal_lm.config.name_or_path or causal_lm.config.model_type).name
    export = gguf_export.GGUFExport(causal_lm.config, tokenizer, quantization, name,
                                    [(tensor, shape) for tensor, shape, _ in plan])

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    partial = _partial_path(path)
    try:
        export.write(partial, [merge for _, _, merge in plan])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone already after a successful rename

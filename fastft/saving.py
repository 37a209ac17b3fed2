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
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from transformers.utils.hub import convert_file_size_to_int

from . import gguf_export
from .quant import _is_params4bit, dequantize_4bit, nf4_weight_of

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


def _lora_layers(causal_lm) -> dict:
    """name -> peft LoRA layer, for every LoRA-wrapped module; refuses adapters this export cannot merge."""
    from peft.tuners.lora import LoraLayer

    from .moe import refuse_moe

    refuse_moe(causal_lm.config, "merging LoRA for save_merged / save_gguf (model.save_pretrained saves the adapter)")

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
    return layers


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
        ``base_model.model.`` prefix, no ``base_layer``), each tensor new (not sharing memory with the model)
        and in ``dtype``. A tied ``lm_head`` is not repeated. Merging is exact in fp32 before the final cast:
        ``W = dequant(W4) + sum over active adapters of scaling * B @ A``.

    Arguments and adapters are checked when this is called (DoRA and embedding LoRAs are refused); the merge
    runs lazily, as the tensors are taken.
    """
    dtype, device = _export_dtype(dtype), _export_device(device)
    causal_lm = _causal_lm(model)
    plan = _merge_plan(causal_lm, _lora_layers(causal_lm), device)
    # one expression per tensor: the fp32 merge result is freed as soon as the cast exists
    return ((name, merge().to(dtype)) for name, _, merge in plan)


def _logical_shape(param) -> tuple[int, ...]:
    """The shape of a parameter's values (a 4-bit weight's ``[out, in]``, not its packed bytes')."""
    return tuple(nf4_weight_of(param).shape) if _is_params4bit(param) else tuple(param.shape)


def _merge_plan(causal_lm, lora_layers: dict, device: torch.device):
    """``(name, shape, merge)`` for each tensor of the merged checkpoint, in parameter order: ``merge()`` computes
    its fp32 value. Nothing is dequantized or merged until ``merge`` is called, so an exporter can lay out a file
    from the names and shapes first (GGUF puts its tensor table before the data)."""
    for name, param in causal_lm.named_parameters():  # deduplicated: a tied lm_head.weight is skipped
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue  # the adapters themselves: merged into their base layer's weight
        if "base_layer" in parts:
            at = parts.index("base_layer")
            layer = lora_layers[".".join(parts[:at])]
            yield (".".join(parts[:at] + parts[at + 1:]), _logical_shape(param),
                   functools.partial(_merged_param, layer, parts[-1], device))
        else:
            yield name, _logical_shape(param), functools.partial(_float_weight, param, device)


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
    config.architectures = [type(causal_lm).__name__]
    return config


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
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
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


def _check_gguf_destination(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise FileExistsError(f"save_gguf writes one file, but {str(path)!r} is a directory; pass a file path such as "
                              f"{str(path / 'model.gguf')!r}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass another path, or overwrite=True to replace it")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FileExistsError(f"overwrite=True replaces a GGUF file, but {str(path)!r} holds something else; "
                                      "pass another path")


def save_gguf(model, path, tokenizer, quantization: str = "f16", *, device="cpu", overwrite: bool = False) -> None:
    """Write ``model`` with its LoRA merged, and its tokenizer, as one GGUF file for llama.cpp, Ollama or LM Studio.

    Args:
        model: a fastft model (a ``PeftModel`` from ``FastModel.get_peft_model``, or a model without LoRA) of an
            architecture fastft patches: Llama (Llama 3.1 RoPE scaling included), Mistral, Qwen2, Qwen3.
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
    path = Path(os.path.expanduser(os.fspath(path)))
    _check_gguf_destination(path, overwrite)
    gguf_export.quantization(quantization)
    device = _export_device(device)
    causal_lm = _causal_lm(model)
    plan = list(_merge_plan(causal_lm, _lora_layers(causal_lm), device))  # names and shapes; nothing merged yet
    name = Path(causal_lm.config.name_or_path or causal_lm.config.model_type).name
    export = gguf_export.GGUFExport(causal_lm.config, tokenizer, quantization, name,
                                    [(tensor, shape) for tensor, shape, _ in plan])

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex}")
    try:
        export.write(partial, [merge for _, _, merge in plan])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone already after a successful rename

"""Random-weight checkpoints: written once per model under ``--cache-dir`` (bf16 safetensors, a tokenizer),
then loaded in 4-bit by every contender."""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from .config import CHECKPOINT_RECIPE, INIT_STD, MODELS


def make_config(name: str):
    import transformers

    arch, kwargs = MODELS[name]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cls(**json.loads(json.dumps(kwargs)))


def _save_tokenizer(path: str) -> None:
    """A 3-token word-level tokenizer: FastModel.from_pretrained loads a tokenizer with the model; the
    benchmark feeds token ids directly, so its vocabulary does not matter."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(name: str, cache_dir: str) -> dict:
    """Write (once) a bf16 safetensors checkpoint of ``name`` with random weights: normal(0, 0.02) for
    every matrix and bias, ones for the norms. The model is built on the meta device only to list the
    parameter names and shapes, and each tensor is drawn on the GPU and written shard by shard, so the
    fp32 model is never materialised. Returns {path, reused, seconds, bytes}."""
    import transformers
    from safetensors.torch import save_file

    path = os.path.join(cache_dir, f"{name}-{CHECKPOINT_RECIPE}")
    marker = os.path.join(path, "bench_checkpoint.json")
    recipe = {"recipe": CHECKPOINT_RECIPE, "model": name, "arch": MODELS[name][0], "config": MODELS[name][1],
              "init_std": INIT_STD, "dtype": "bfloat16", "seed": 1234}
    recipe = json.loads(json.dumps(recipe))
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                return {"path": path, "reused": True, "seconds": 0.0, "bytes": _dir_bytes(path)}
    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    config = make_config(name)
    with torch.device("meta"):
        meta_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = [(key, tuple(t.shape)) for key, t in meta_model.state_dict().items()]
    del meta_model
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(recipe["seed"])
    shard, shard_bytes, shard_id, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, shard_id
        if shard:
            shard_id += 1
            file = f"model-{shard_id:05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({key: file for key in shard})
            shard, shard_bytes = {}, 0

    for key, shape in shapes:
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            tensor = tensor.mul_(INIT_STD).to(torch.bfloat16).cpu()
        shard[key] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        shard_bytes += nbytes
        total += nbytes
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(path)
    _save_tokenizer(path)
    with open(marker, "w") as f:
        json.dump(recipe, f, indent=1)
    return {"path": path, "reused": False, "seconds": round(time.perf_counter() - t0, 2), "bytes": _dir_bytes(path)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

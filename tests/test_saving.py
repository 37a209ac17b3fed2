"""fastft.saving: the merged export, written layer by layer into a checkpoint that plain transformers loads."""
import errno
import gc
import json

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from kernel_testing import assert_close
from memory_tracking import LiveTensorBytes
from tiny_models import padded_batch, randomize_lora, save_tiny_model

import fastft.saving
from fastft import FastModel
from fastft.saving import iter_merged_tensors, save_merged


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    # four layers: the whole model is several times one layer, so a whole-model copy cannot pass for a layer
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=4)


def lora_model(path):
    model, tokenizer = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model.eval(), tokenizer


def test_sharded_export_loads_in_plain_transformers_and_matches(llama_path, tmp_path):
    model, tokenizer = lora_model(llama_path)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    save_merged(model, tmp_path / "merged", tokenizer, dtype=torch.float32, max_shard_size=100_000)

    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:
        assert (tmp_path / "merged" / file).stat().st_size <= 100_000 + 4096  # + the safetensors header
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert sorted(index["weight_map"]) == sorted(plain.state_dict())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4, name="merged logits")


def test_phi3_fused_projections_merge_into_a_plain_checkpoint(tmp_path):
    """Phi-3's one LoRA on the fused qkv_proj and gate_up_proj merges into that fused weight; the checkpoint (with
    Phi-4-mini's partial rotary + LongRoPE config) loads in plain transformers and computes the LoRA model's logits,
    past the LongRoPE switch too (21 tokens > 16)."""
    path = save_tiny_model("phi3_longrope", tmp_path / "phi3")
    model, tokenizer = lora_model(path)
    ids = torch.randint(4, 211, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    save_merged(model, tmp_path / "merged", tokenizer, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert plain.config.rope_parameters == model.config.rope_parameters
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(
        plain.state_dict())
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4, name="merged logits")


def test_iter_merged_tensors_names_and_tied_head(tmp_path):
    qwen2 = save_tiny_model("qwen2", tmp_path / "qwen2")  # ties lm_head to the input embeddings
    model, _ = lora_model(qwen2)
    merged = dict(iter_merged_tensors(model, dtype="float16"))
    plain = transformers.AutoModelForCausalLM.from_pretrained(qwen2)
    assert "lm_head.weight" not in merged
    assert sorted(merged) == sorted(set(plain.state_dict()) - {"lm_head.weight"})
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in merged.values())
    # the merge itself, for one layer: dequantized base + scaling * B @ A (float64 here)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    base = fastft.dequantize_4bit(layer.base_layer.weight).double()
    expected = base + layer.scaling["default"] * (layer.lora_B["default"].weight.double()
                                                  @ layer.lora_A["default"].weight.double())
    # one rounding to fp16 (half an ulp: 2**-11 relative; 2**-25 absolute among subnormals) after the fp32 merge
    assert_close(merged["model.layers.1.mlp.down_proj.weight"], expected, atol=2**-25, rtol=2**-11 + 2**-20,
                 name="down_proj")


def test_peak_extra_memory_is_one_layer_plus_one_shard(llama_path, tmp_path, monkeypatch):
    model, _ = lora_model(llama_path)
    shard = 40_000
    sizes = [t.numel() for _, t in iter_merged_tensors(model)]
    largest, total = max(sizes) * 4, sum(sizes) * 2  # the biggest weight in fp32; the whole bf16 export

    # Triton's interpreter leaves each launch's arguments (its output included) in reference cycles until the
    # next garbage collection; a compiled GPU launch does not. Collect after each dequantization, so that what
    # is measured is the export's own allocations.
    dequantize = fastft.saving.dequantize_4bit

    def dequantize_then_collect(weight):
        out = dequantize(weight)
        gc.collect()
        return out

    monkeypatch.setattr(fastft.saving, "dequantize_4bit", dequantize_then_collect)
    with LiveTensorBytes() as memory:
        save_merged(model, tmp_path / "merged", dtype="bfloat16", max_shard_size=shard)
    gc.collect()
    # alive at once, at most: the shard being filled, the fp32 weight being merged and its bf16 cast
    bound = shard + 1.5 * largest
    assert bound < total / 2  # the bound tells a streamed export from one that holds the whole model
    assert memory.peak <= bound, f"peak {memory.peak} B > bound {bound} B (whole bf16 export: {total} B)"
    assert memory.live == 0  # nothing kept afterwards


def _no_merging(*args, **kwargs):
    raise AssertionError("merged before the destination was checked")


def test_existing_destination_is_refused_before_merging(llama_path, tmp_path, monkeypatch):
    model, _ = lora_model(llama_path)
    monkeypatch.setattr(fastft.saving, "_float_weight", _no_merging)
    (tmp_path / "file").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="is a file"):
        save_merged(model, tmp_path / "file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        save_merged(model, tmp_path / "notes")
    with pytest.raises(FileExistsError, match="holds something else"):  # overwrite replaces checkpoints only
        save_merged(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "file").read_text() == "not a checkpoint"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_overwrite_and_empty_directory(llama_path, tmp_path):
    model, _ = lora_model(llama_path)
    (tmp_path / "merged").mkdir()  # an empty directory is a fine destination
    save_merged(model, tmp_path / "merged", dtype="float16")
    save_merged(model, tmp_path / "merged", dtype="bfloat16", overwrite=True)
    with safetensors.safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory left


@pytest.mark.parametrize("failing_write", [1, 2])  # the first weights file, or the second shard
def test_full_disk_leaves_no_partial_checkpoint(llama_path, tmp_path, monkeypatch, failing_write):
    model, _ = lora_model(llama_path)
    save_merged(model, tmp_path / "previous", dtype="float32")
    before = {p.name: p.read_bytes() for p in (tmp_path / "previous").iterdir()}
    writes = []
    real_save_file = safetensors.torch.save_file

    def disk_full(*args, **kwargs):
        writes.append(args)
        if len(writes) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_merged(model, tmp_path / "new", max_shard_size=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # neither "new" nor a temporary directory
    writes.clear()
    with pytest.raises(OSError, match="No space left"):
        save_merged(model, tmp_path / "previous", max_shard_size=100_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "previous").iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_names(llama_path, tmp_path, dtype, expected):
    model, _ = lora_model(llama_path)
    save_merged(model, tmp_path / "merged", dtype=dtype)
    with safetensors.safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {expected}
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.dtype == expected


@pytest.mark.parametrize("kwargs, match", [(dict(dtype="int8"), "dtype must be"), (dict(dtype=torch.float64), "dtype"),
                                           (dict(device="gpu0"), "device must be"),
                                           (dict(max_shard_size="lots"), "max_shard_size")])
def test_bad_arguments_are_clear_errors(llama_path, tmp_path, kwargs, match):
    model, _ = lora_model(llama_path)
    with pytest.raises(ValueError, match=match):
        save_merged(model, tmp_path / "merged", **kwargs)
    assert not (tmp_path / "merged").exists()

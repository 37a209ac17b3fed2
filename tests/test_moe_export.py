"""Merged and GGUF export of mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) with 4-bit experts and LoRA on
the experts (peft's ``target_parameters``).

* ``save_merged``: the checkpoint has transformers' own layout for the architecture (the keys its ``save_pretrained``
  writes), reloads in plain transformers, and computes the fastft model's logits; each merged expert equals the NF4
  codes decoded independently (``decode_nf4``) plus peft's own ``ParamWrapper.get_delta_weight``.
* ``save_gguf``: llama.cpp's MoE layout; Qwen3-MoE and Qwen2-MoE read back with transformers' GGUF reader and compute
  the fastft model's logits; Mixtral (llama.cpp's ``llama`` with experts, which that reader loads as a dense Llama)
  is checked tensor by tensor against the merged checkpoint.

Tolerances (fp32): both sides compute in fp32 from the same values (the merge ``W + s * B @ A`` in fp32 against the
model's ``x W + s (x A) B``), so only summation order differs (~1e-6 relative); a missing or transposed LoRA delta
(scaled ~10-30% of the base here) moves logits by > 1e-3, which the tests also assert so that they cannot pass
vacuously. Routing follows the same logits on both sides (a top-k tie flip would be a > 1e-3 change, not seen).
"""
import gguf
import numpy as np
import pytest
import safetensors
import torch
import transformers
from kernel_testing import assert_close
from test_moe import ARCHS, decode_nf4, save_tiny_moe
from tiny_models import padded_batch, randomize_lora
from tiny_tokenizer import CORPUS, tiny_bpe_tokenizer

from fastft import FastModel
from fastft.kernels import use_engine
from fastft.moe import sparse_blocks
from fastft.saving import iter_merged_tensors, save_gguf, save_merged

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True, scope="module")
def _pytorch_engine():
    # the export is under test, not the kernels: fastft's PyTorch engine (the Triton interpreter is slow)
    with use_engine("torch"):
        yield


def lora_moe(path, load_in_4bit=True):
    """The fastft model of ``path`` with (4-bit) experts and random LoRA on attention and every expert."""
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32, load_in_4bit=load_in_4bit)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model.eval()


def checkpoint_keys(directory) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safetensors.safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def logits_of(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def wrapper_of(experts, parameter):
    """peft's ParamWrapper of one expert parameter (they nest, one per targeted parameter)."""
    while experts.parameter_name != parameter:
        experts = experts.base_layer
    return experts


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_reloads_in_plain_transformers(arch, tmp_path):
    path = save_tiny_moe(arch, tmp_path / "base")
    model = lora_moe(path)
    reloaded = reload_merged(model, tmp_path / "merged")

    # the architecture's checkpoint layout: exactly the keys transformers' save_pretrained wrote for the base model
    # (one tensor per expert and projection; Mixtral's block_sparse_moe.experts.N.w1/w2/w3)
    assert checkpoint_keys(tmp_path / "merged") == checkpoint_keys(tmp_path / "base")

    # each expert: the NF4 codes decoded from their definition plus peft's own delta (its einsum, its transposition)
    for ours, theirs in zip(sparse_blocks(model), sparse_blocks(reloaded), strict=True):
        for parameter in ("gate_up_proj", "down_proj"):
            wrapper = wrapper_of(ours.experts, parameter)
            codes = getattr(wrapper.get_base_layer(), parameter).nf4
            delta = wrapper.get_delta_weight("default").detach().double()
            expected = decode_nf4(codes) + delta
            assert delta.abs().max() > 0.1 * expected.abs().max()  # the LoRA is a visible part of it
            got = getattr(theirs.experts, parameter).detach().double()
            assert_close(got, expected, atol=1e-6 * expected.abs().max().item(), rtol=0, name=parameter)

    assert_same_logits(reloaded, model)


def reload_merged(model, directory):
    save_merged(model, directory, dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def assert_same_logits(reloaded, model):
    """The reloaded merged checkpoint computes the fastft model's logits, which its LoRA visibly moves."""
    ids, mask, _ = padded_batch()
    real = mask.bool()
    expected = logits_of(model, ids, mask)
    assert_close(logits_of(reloaded, ids, mask)[real], expected[real], atol=2e-5, rtol=1e-5, name="logits")
    with model.disable_adapter():
        assert (logits_of(model, ids, mask) - expected)[real].abs().max() > 1e-3


def test_merged_16bit_experts(tmp_path):
    """load_in_4bit=False: the experts are plain 16-bit (here fp32) tensors, merged the same way."""
    model = lora_moe(save_tiny_moe("qwen2_moe", tmp_path / "base"), load_in_4bit=False)
    assert_same_logits(reload_merged(model, tmp_path / "merged"), model)


def gguf_moe(arch, tmp_path, quantization="f32", **overrides):
    """A tiny MoE with LoRA, with a vocabulary for the BPE tokenizer llama.cpp runs (400 tokens), saved as GGUF."""
    path = save_tiny_moe(arch, tmp_path / f"tiny-{arch}", vocab_size=416, **overrides)
    model, tokenizer = lora_moe(path), tiny_bpe_tokenizer()
    save_gguf(model, tmp_path / "model.gguf", tokenizer, quantization)
    return model, tokenizer, gguf.GGUFReader(tmp_path / "model.gguf")


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_qwen_moe_gguf_reads_back_in_transformers(arch, tmp_path):
    """llama.cpp's qwen3moe / qwen2moe: stacked experts, F32 router (and 1-D F32 shared-expert gate), expert metadata;
    transformers' GGUF reader rebuilds the model and it computes the fastft model's logits."""
    model, tokenizer, reader = gguf_moe(arch, tmp_path, mlp_only_layers=[])
    config = model.config
    gguf_arch = arch.replace("_", "")
    assert field(reader, "general.architecture") == gguf_arch
    assert field(reader, f"{gguf_arch}.expert_count") == config.num_experts
    assert field(reader, f"{gguf_arch}.expert_used_count") == config.num_experts_per_tok
    assert field(reader, f"{gguf_arch}.expert_feed_forward_length") == config.moe_intermediate_size
    tensors = {t.name: t for t in reader.tensors}
    E, H, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    for w, shape in (("gate", [H, inter, E]), ("up", [H, inter, E]), ("down", [inter, H, E])):  # GGUF: dims reversed
        assert tensors[f"blk.0.ffn_{w}_exps.weight"].shape.tolist() == shape
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32
    if arch == "qwen2_moe":
        assert field(reader, "qwen2moe.expert_shared_feed_forward_length") == config.shared_expert_intermediate_size
        gate = tensors["blk.0.ffn_gate_inp_shexp.weight"]
        assert gate.shape.tolist() == [H] and gate.tensor_type == Q.F32
        assert "blk.0.ffn_up_shexp.weight" in tensors

    # transformers' reader does not map the expert widths (expert_feed_forward_length): give it the model's
    their_config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="model.gguf")
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size", "head_dim"):
        if hasattr(config, key):
            setattr(their_config, key, getattr(config, key))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", config=their_config, dtype=torch.float32).eval()
    ids = tokenizer(CORPUS[0] + CORPUS[2], return_tensors="pt").input_ids[:, :48]
    expected = logits_of(model, ids)
    assert_close(logits_of(theirs, ids), expected, atol=2e-5, rtol=1e-5, name=f"{arch} GGUF logits")
    with model.disable_adapter():
        assert (logits_of(model, ids) - expected).abs().max() > 1e-3

    # quantized, as llama.cpp's converter and llama-quantize do it: routers (and the shared expert's gate) stay F32
    save_gguf(model, tmp_path / "q8_0.gguf", tokenizer, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    for layer in range(config.num_hidden_layers):
        assert types[f"blk.{layer}.ffn_gate_inp.weight"] == Q.F32
        assert all(types[f"blk.{layer}.ffn_{w}_exps.weight"] == Q.Q8_0 for w in ("gate", "up", "down"))
        if arch == "qwen2_moe":
            assert types[f"blk.{layer}.ffn_gate_inp_shexp.weight"] == Q.F32
            assert all(types[f"blk.{layer}.ffn_{w}_shexp.weight"] == Q.Q8_0 for w in ("gate", "up", "down"))


def test_mixtral_gguf_is_llama_with_experts(tmp_path):
    """llama.cpp's llama architecture with experts: every tensor is the merged checkpoint's, in llama.cpp's layout
    (q/k permuted per head, experts stacked, w1 -> ffn_gate_exps, w3 -> ffn_up_exps, w2 -> ffn_down_exps)."""
    model, _, reader = gguf_moe("mixtral", tmp_path)
    config = model.config
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.expert_count") == config.num_local_experts
    assert field(reader, "llama.expert_used_count") == config.num_experts_per_tok
    assert field(reader, "llama.feed_forward_length") == config.intermediate_size
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    merged = dict(iter_merged_tensors(model, torch.float32))
    E = config.num_local_experts
    for layer in range(config.num_hidden_layers):
        block = f"model.layers.{layer}.block_sparse_moe"
        for gguf_name, w in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            expected = torch.stack([merged[f"{block}.experts.{e}.{w}.weight"] for e in range(E)])
            assert torch.equal(stored[f"blk.{layer}.{gguf_name}.weight"], expected), gguf_name
        assert torch.equal(stored[f"blk.{layer}.ffn_gate_inp.weight"], merged[f"{block}.gate.weight"])
        q = merged[f"model.layers.{layer}.self_attn.q_proj.weight"]
        permuted = q.reshape(config.num_attention_heads, 2, -1, q.shape[1]).transpose(1, 2).reshape(q.shape)
        assert torch.equal(stored[f"blk.{layer}.attn_q.weight"], permuted)
    assert not any("experts" in name for name in stored)


def test_moe_layouts_llama_cpp_computes_differently_are_refused(tmp_path):
    path = save_tiny_moe("qwen3_moe", tmp_path / "tiny", vocab_size=416)  # layer 1 is dense (mlp_only_layers=[1])
    model = lora_moe(path)
    with pytest.raises(ValueError, match=r"sparse MoE block in every layer.*mlp_only_layers=\[1\]"):
        save_gguf(model, tmp_path / "model.gguf", tiny_bpe_tokenizer())
    model.config.mlp_only_layers = []
    model.config.norm_topk_prob = False
    with pytest.raises(ValueError, match="qwen3moe architecture always renormalizes .* norm_topk_prob=False"):
        save_gguf(model, tmp_path / "model.gguf", tiny_bpe_tokenizer())
    assert not (tmp_path / "model.gguf").exists()

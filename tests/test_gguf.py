"""fastft.saving.save_gguf: one GGUF file for llama.cpp, read back with transformers' GGUF reader (which undoes
llama.cpp's conventions: q/k permutation, tensor names, tokenizer metadata) and with the gguf package's reader.

Shapes: hidden 128 with 2 heads of 64 (transformers' GGUF reader derives Qwen2's head size from hidden / heads and
takes Qwen3's default of 128), rows that are multiples of 32 (the q4/q5/q8 block), a vocabulary of 416 rows for a
tokenizer of 400 tokens (llama.cpp pads the token list)."""
import errno
import gc

import gguf
import numpy as np
import pytest
import torch
import transformers
from kernel_testing import assert_close
from memory_tracking import LiveTensorBytes
from tiny_models import randomize_lora, save_tiny_model
from tiny_tokenizer import (
    CORPUS,
    tiny_bpe_tokenizer,
    tiny_phi3_tokenizer,
    tiny_sentencepiece_tokenizer,
    tiny_tokenizer,
)

import fastft.gguf_export
import fastft.saving
from fastft import FastModel
from fastft.kernels import use_engine
from fastft.saving import iter_merged_tensors, save_gguf

SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=192,
             vocab_size=416)
QWEN3_SHAPE = dict(SHAPE, hidden_size=256, head_dim=128)
Q = gguf.GGMLQuantizationType
CHAT = [{"role": "user", "content": "What is 2+2? It's 4, isn't it?"}, {"role": "assistant", "content": "Yes: 4."}]


@pytest.fixture(autouse=True, scope="module")
def _pytorch_engine():
    # the export, not the kernels, is under test here: dequantize in PyTorch, not in Triton's (slow) interpreter
    with use_engine("torch"):
        yield


def lora_model(path):
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)  # 4-bit NF4
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model.eval()


def tiny(tmp_path_factory, arch, tokenizer, **shape):
    # the directory's name is general.name, and transformers takes a file named exactly "mistral" for its own
    # Mistral GGUF layout, which its reader cannot load; llama.cpp ignores the name
    path = save_tiny_model(arch, tmp_path_factory.mktemp(arch) / f"tiny-{arch}", **(shape or SHAPE))
    tokenizer.save_pretrained(path)
    return lora_model(path), tokenizer


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):  # tied head, q/k/v biases, no permutation in llama.cpp
    return tiny(tmp_path_factory, "qwen2", tiny_bpe_tokenizer())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):  # separate head, q/k permuted in llama.cpp
    return tiny(tmp_path_factory, "llama", tiny_bpe_tokenizer())


def merged_reference(model, transform=lambda name, tensor: tensor):
    """The merged model as a plain transformers model in fp32 (each tensor through ``transform`` first)."""
    causal_lm = model.get_base_model()
    reference = transformers.AutoModelForCausalLM.from_config(fastft.saving._plain_config(causal_lm, torch.float32))
    state = {name: transform(name, tensor) for name, tensor in iter_merged_tensors(model, torch.float32)}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    return reference.eval()


def load_gguf(file):
    kwargs = dict(gguf_file=file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs).eval()
    return model, transformers.AutoTokenizer.from_pretrained(file.parent, **kwargs)


def logits(model, tokenizer):
    ids = tokenizer(CORPUS[0] + CORPUS[2] + CORPUS[3], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        return model(ids).logits


def assert_same_tokenizer(theirs, ours):
    for text in CORPUS + ["", "<|im_start|>user\nhi<|im_end|>", ours.apply_chat_template(CHAT, tokenize=False)]:
        assert theirs(text).input_ids == ours(text).input_ids, text
    assert theirs.apply_chat_template(CHAT) == ours.apply_chat_template(CHAT)


def tensor_types(file) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_round_trip_matches_the_merged_model(arch, tmp_path_factory, tmp_path):
    """f32: the GGUF model computes the merged model's logits, and its tokenizer encodes as the original does.
    Phi-3: its fused qkv_proj and gate_up_proj (with their LoRA merged) and Phi-3's SentencePiece-style tokenizer."""
    sentencepiece = arch in ("mistral", "phi3")
    tokenizer = {"mistral": tiny_sentencepiece_tokenizer, "phi3": tiny_phi3_tokenizer}.get(arch, tiny_bpe_tokenizer)()
    shape = dict(QWEN3_SHAPE if arch == "qwen3" else SHAPE, **({"sliding_window": None} if arch == "mistral" else {}))
    model, tokenizer = tiny(tmp_path_factory, arch, tokenizer, **shape)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")

    theirs, their_tokenizer = load_gguf(tmp_path / "model.gguf")
    expected = logits(merged_reference(model), tokenizer)
    assert_close(logits(theirs, tokenizer), expected, atol=1e-5 * expected.abs().max().item(), rtol=0, name=arch)
    assert_same_tokenizer(their_tokenizer, tokenizer)
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    assert fields["general.architecture"].contents() == ("llama" if arch == "mistral" else arch)
    assert fields["tokenizer.ggml.model"].contents() == ("llama" if sentencepiece else "gpt2")


def expected_types(names, quant: Q) -> dict[str, Q]:
    """llama.cpp's choices, written out: 1-D tensors (norms, biases) F32; for the types llama-quantize makes, the
    output head (or the embedding it is tied to) Q8_0 (llama.cpp: Q6_K, which gguf cannot write); all else ``quant``."""
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    small = quant in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
    return {name: Q.F32 if name.endswith(("norm.weight", ".bias")) else Q.Q8_0 if small and name == head else quant
            for name in names}


def through_type(tensor: torch.Tensor, qtype: Q) -> torch.Tensor:
    """``tensor`` after storage as ``qtype`` (quantization works along rows, so a row permutation commutes with it)."""
    stored = gguf.quants.quantize(tensor.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(stored, qtype).reshape(tensor.shape).astype(np.float32))


# Relative L2 error of the logits against the unquantized merged model, allowed per type, about 2x what each gives on
# these models (measured: f16 5e-4, bf16 5e-3, q8_0 1.2e-2, q5_x 8e-2, q4_x 2.1e-1). A transposed o_proj gives 1.4;
# q/k left unpermuted, 0.1-0.2, and a dropped bias, 0.4: the q4/q5 bounds cannot tell those, which is why each type is
# also checked against the model with its weights stored in that type, to 1e-5 (a layout or type error shows there).
TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-2, "q8_0": 3e-2, "q5_1": 0.15, "q5_0": 0.2, "q4_1": 0.4, "q4_0": 0.4}


@pytest.mark.parametrize("quantization", fastft.gguf_export.quantizations())
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_quantization_types(arch, quantization, request, tmp_path):
    model, tokenizer = request.getfixturevalue(arch)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, quantization)

    types = tensor_types(tmp_path / "model.gguf")
    _, quant = fastft.gguf_export.quantization(quantization)
    assert types == expected_types(list(types), quant)
    assert ("output.weight" in types) == (arch == "llama")  # Qwen2's head is its embedding

    theirs = logits(load_gguf(tmp_path / "model.gguf")[0], tokenizer)
    config = model.get_base_model().config
    names = gguf.get_tensor_name_map(fastft.gguf_export._ARCHITECTURES[arch][0], config.num_hidden_layers)
    stored = merged_reference(model, lambda name, t: through_type(t, types[names.get_name(name, (".weight", ".bias"))]))
    assert_close(theirs, logits(stored, tokenizer), atol=1e-5, rtol=1e-5, name=f"{quantization} vs stored weights")
    exact = logits(merged_reference(model), tokenizer)
    assert ((theirs - exact).norm() / exact.norm()).item() < TOLERANCE[quantization]


def test_bundled_smollm2_round_trip(tmp_path):
    """The real model (30 layers, 9 query / 3 key-value heads, tied head, SmolLM's BPE vocabulary of 49152 tokens) at
    the default f16. Loaded in 16-bit: the 4-bit merge is the tiny models' part, and dequantizing 135M parameters
    would double this test's time."""
    from fastft.bundled import bundled_model_path

    model, tokenizer = FastModel.from_pretrained(bundled_model_path(), max_seq_length=64, dtype=torch.float32,
                                                 load_in_4bit=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, use_gradient_checkpointing=False)
    randomize_lora(model, std=0.01)
    save_gguf(model, tmp_path / "smollm2.gguf", tokenizer)
    types = tensor_types(tmp_path / "smollm2.gguf")
    assert types == expected_types(list(types), Q.F16) and "output.weight" not in types

    theirs, their_tokenizer = load_gguf(tmp_path / "smollm2.gguf")
    assert_same_tokenizer(their_tokenizer, tokenizer)
    expected = logits(model.eval(), tokenizer)  # the LoRA model itself, unmerged
    got = logits(theirs, tokenizer)
    # measured: 2e-3 (the merged weights rounded to f16); with q/k left unpermuted, 0.48 (and 22% of argmaxes agree)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_llama31_rope_scaling_is_rope_freqs(tmp_path_factory, tmp_path):
    """Llama 3.1's RoPE scaling goes in as llama.cpp's per-frequency divisors: the default frequencies divided by
    them are transformers' llama3 frequencies."""
    model, tokenizer = tiny(tmp_path_factory, "llama31", tiny_bpe_tokenizer())
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")
    tensor = next(t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors if t.name == "rope_freqs.weight")
    assert tensor.tensor_type == Q.F32
    config = model.get_base_model().config
    llama3, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    default = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    divisors = torch.from_numpy(np.array(tensor.data, dtype=np.float64))
    assert (divisors > 1).any() and (divisors == 1).any()  # both ends of the scaling are exercised
    assert_close(default / divisors, llama3, atol=0, rtol=1e-6, name="llama3 frequencies")


def test_phi3_partial_rotary_and_longrope_as_llama_cpp_reads_them(tmp_path_factory, tmp_path):
    """Phi-4-mini's RoPE (transformers' GGUF reader ignores it, so the file is checked field by field): 48 of 64
    dims rotated, LongRoPE's factors as rope_factors_long/short, transformers' attention factor, the original
    context of 16 positions, no window; the fused qkv_proj / gate_up_proj tensors hold the merged weights."""
    model, tokenizer = tiny(tmp_path_factory, "phi3_longrope", tiny_bpe_tokenizer(), **SHAPE)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "f32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = model.get_base_model().config
    rope = config.rope_parameters
    assert fields["general.architecture"] == "phi3"
    assert fields["phi3.rope.dimension_count"] == 48 and fields["phi3.rope.scaling.original_context_length"] == 16
    assert fields["phi3.attention.sliding_window"] == 0 and fields["phi3.context_length"] == 64
    attention_scaling = model.get_base_model().model.rotary_emb.attention_scaling
    assert attention_scaling > 1.1  # sqrt(1 + ln 4 / ln 16): the factor is really exercised
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(attention_scaling, rel=1e-6)
    tensors = {t.name: t for t in reader.tensors}
    for kind in ("long", "short"):
        factors = tensors[f"rope_factors_{kind}.weight"]
        assert factors.tensor_type == Q.F32
        assert np.allclose(np.asarray(factors.data), rope[f"{kind}_factor"], rtol=1e-7, atol=0)
    merged = dict(iter_merged_tensors(model, torch.float32))
    for hf_name, gguf_name in (("model.layers.1.self_attn.qkv_proj.weight", "blk.1.attn_qkv.weight"),
                               ("model.layers.1.mlp.gate_up_proj.weight", "blk.1.ffn_up.weight")):
        stored = torch.from_numpy(np.array(tensors[gguf_name].data)).reshape(merged[hf_name].shape)
        assert torch.equal(stored, merged[hf_name]), gguf_name
    assert "output.weight" not in tensors  # its head is tied to the embedding


def test_phi3_sliding_window_is_warned_about(tmp_path_factory, tmp_path):
    """llama.cpp disables SWA for phi3 (Phi-3-mini-4k's window of 2047 is written, then ignored): say so."""
    model, tokenizer = tiny(tmp_path_factory, "phi3_sliding", tiny_phi3_tokenizer(), **SHAPE)
    with pytest.warns(UserWarning, match="sliding window of 3 tokens, which llama.cpp's phi3 architecture does not"):
        save_gguf(model, tmp_path / "model.gguf", tokenizer, "q8_0")
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["phi3.attention.sliding_window"].contents() == 3


@pytest.mark.parametrize("split, pre", [("gpt2", "gpt-2"), ("smollm", "smollm"), ("llama3", "llama-bpe"),
                                        ("qwen2", "qwen2")])
def test_pre_tokenizer_is_named_for_llama_cpp(split, pre, llama, tmp_path):
    """llama.cpp splits text by the regex its `tokenizer.ggml.pre` names, so the name must be the one whose split
    the tokenizer's merges were learned on."""
    model, _ = llama
    tokenizer = tiny_bpe_tokenizer(split=split)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "q8_0")
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["tokenizer.ggml.pre"].contents() == pre
    assert_same_tokenizer(load_gguf(tmp_path / "model.gguf")[1], tokenizer)


def test_merged_and_written_one_tensor_at_a_time(llama, tmp_path, monkeypatch):
    model, tokenizer = llama
    sizes = [t.numel() for _, t in iter_merged_tensors(model, torch.float32)]
    largest, total = max(sizes) * 4, sum(sizes) * 4
    events = []
    float_weight, write_tensor_data = fastft.saving._float_weight, gguf.GGUFWriter.write_tensor_data

    def merge(*args):
        events.append("merge")
        return float_weight(*args)

    def write(self, tensor, *args):
        events.append("write")
        return write_tensor_data(self, tensor, *args)

    monkeypatch.setattr(fastft.saving, "_float_weight", merge)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    gc.collect()
    with LiveTensorBytes() as memory:
        save_gguf(model, tmp_path / "model.gguf", tokenizer, "q8_0")
    gc.collect()
    assert events == ["merge", "write"] * len(sizes)  # each quantized array is written before the next merge
    # alive at once, at most: the merged fp32 tensor, its permuted copy (q/k) or the dequantization's temporaries
    bound = 2.5 * largest
    assert bound < total / 2  # the bound tells a streamed export from one that holds the whole model
    assert memory.peak <= bound, f"peak {memory.peak} B > bound {bound} B (whole fp32 model: {total} B)"
    assert memory.live == 0


def _no_merging(*args, **kwargs):
    raise AssertionError("merged before the arguments were checked")


def test_bad_arguments_are_refused_before_merging(llama, tmp_path, monkeypatch):
    model, tokenizer = llama
    monkeypatch.setattr(fastft.saving, "_float_weight", _no_merging)
    with pytest.raises(ValueError, match=r"one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 .*'q4_k_m'.*"
                                         r"llama-quantize"):
        save_gguf(model, tmp_path / "model.gguf", tokenizer, "q4_k_m")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        save_gguf(model, tmp_path / "model.gguf", None)
    with pytest.raises(ValueError, match="writes tokenizers that llama.cpp runs the same way.*WordLevel"):
        save_gguf(model, tmp_path / "model.gguf", tiny_tokenizer())
    with pytest.raises(FileExistsError, match="is a directory"):
        save_gguf(model, tmp_path, tokenizer)
    (tmp_path / "notes.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists; .*overwrite=True"):
        save_gguf(model, tmp_path / "notes.gguf", tokenizer)
    with pytest.raises(FileExistsError, match="holds something else"):  # overwrite replaces GGUF files only
        save_gguf(model, tmp_path / "notes.gguf", tokenizer, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"]
    assert (tmp_path / "notes.gguf").read_text() == "keep me"


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    config = transformers.GemmaConfig(vocab_size=416, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    with pytest.raises(ValueError, match="exports llama, mistral, qwen2, qwen3, phi3 models; this one is 'gemma'"):
        save_gguf(transformers.GemmaForCausalLM(config), tmp_path / "model.gguf", tiny_bpe_tokenizer())
    assert not any(tmp_path.iterdir())


def test_full_disk_leaves_the_previous_file(llama, tmp_path, monkeypatch):
    model, tokenizer = llama
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "q4_0")
    before = (tmp_path / "model.gguf").read_bytes()
    writes = []
    write_tensor_data = gguf.GGUFWriter.write_tensor_data

    def disk_full(self, tensor, *args):
        writes.append(tensor)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_tensor_data(self, tensor, *args)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_gguf(model, tmp_path / "model.gguf", tokenizer, "f16", overwrite=True)
    writes.clear()
    with pytest.raises(OSError, match="No space left"):
        save_gguf(model, tmp_path / "new.gguf", tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # neither new.gguf nor a partial file
    assert (tmp_path / "model.gguf").read_bytes() == before
    monkeypatch.undo()
    save_gguf(model, tmp_path / "model.gguf", tokenizer, "Q8_0", overwrite=True)  # any case
    assert tensor_types(tmp_path / "model.gguf")["blk.0.attn_q.weight"] == Q.Q8_0

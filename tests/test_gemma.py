"""Gemma 2 and Gemma 3 (text) against unpatched transformers + peft: the fp32 parity tests of
tests/test_model_parity.py (padded in 4-bit and 16-bit, packed; its arch-independent tests, adapters and gradient
accumulation, run on the other archs), bf16 with a tolerance derived from transformers' own bf16 error, which kernels
serve which module, the attention routes of a soft-capped model, generation with the KV cache, and the multimodal
Gemma 3 checkpoint that fastft refuses.
"""
import peft
import pytest
import test_model_parity as parity
import torch
import transformers
from kernel_testing import assert_close, greedy_generate
from test_model_parity import load_pair, train_step
from tiny_models import copy_lora, load_baseline, padded_batch, randomize_lora, save_tiny_model
from tiny_tokenizer import tiny_tokenizer

import fastft.attention as fastft_attention
from fastft import FastModel
from fastft.architectures import UnsupportedModelError, spec_for
from fastft.kernels import use_engine
from fastft.patch import attention_forward, mlp_forward, unit_offset_rms_norm_forward
from fastft.saving import save_merged

ARCHS = ["gemma2", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_path(request, tmp_path_factory):
    return request.param, save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
def test_logits_loss_and_lora_grads_match_hf(arch_path, load_in_4bit):
    parity.test_logits_loss_and_lora_grads_match_hf(arch_path, load_in_4bit)


def test_packed_sequences_match_hf(arch_path):
    parity.test_packed_sequences_match_hf(arch_path, with_cu_seqlens=True)


def test_every_gemma_module_runs_fastfts_forward(arch_path):
    """Four (1 + w) norms per layer, the final norm (and Gemma 3's q/k norms) on the rms_norm kernel with
    unit_offset, the GeGLU MLP, fastft's attention kernel (head size 256 for Gemma 2)."""
    arch, path = arch_path
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    assert model.config._attn_implementation == "fastft"
    backbone = model.model
    for layer in backbone.layers:
        norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm]
        if arch == "gemma3":
            norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        assert all(norm.forward.__func__ is unit_offset_rms_norm_forward for norm in norms)
        assert layer.self_attn.forward.__func__ is attention_forward
        assert layer.mlp.forward.__func__ is mlp_forward and layer.mlp._fastft_spec.activation == "gelu_tanh"
    assert backbone.norm.forward.__func__ is unit_offset_rms_norm_forward
    windows = [layer.self_attn._fastft_spec.sliding_window(layer.self_attn) for layer in backbone.layers]
    assert windows == ([5, None] if arch == "gemma2" else [4, None])  # config.layer_types
    assert backbone.layers[0].self_attn.head_dim == (256 if arch == "gemma2" else 64)


def _bf16_rounded_checkpoint(arch, path):
    """The tiny checkpoint with every weight rounded to bf16 and stored in fp32: the fp32 and bf16 models below
    then hold the same values."""
    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model(arch, path / "fp32"))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    model.save_pretrained(path / "rounded")
    transformers.AutoTokenizer.from_pretrained(path / "fp32").save_pretrained(path / "rounded")
    return str(path / "rounded")


def _errors(result, truth):
    """Relative errors ``||result - truth|| / ||truth||`` of the logits and the loss, and their root mean square over
    every LoRA gradient (one number: single small tensors are too noisy to bound one by one)."""
    def rel(name):
        got, expected = result[name].double(), truth[name].double()
        return ((got - expected).norm() / expected.norm()).item()

    grads = [rel(name) for name in truth if name not in ("logits", "loss")]
    return {"logits": rel("logits"), "loss": rel("loss"), "lora_grads": (sum(e * e for e in grads) / len(grads)) ** 0.5}


def _run(model, ids, mask, labels):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    loss, grads = train_step(model, ids, mask, labels)
    real = mask.bool()
    return {"logits": logits[real], "loss": loss.float().reshape(1), **grads}


def test_bf16_is_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """bf16 (16-bit weights): fastft's logits, loss and LoRA gradients are within 2x (plus one bf16 rounding, 2^-8)
    of transformers + peft's own bf16 distance from the fp32 result of the same weights. The tolerance is derived
    from the baseline's rounding, not chosen: bf16 rounds every activation to 8 bits, so two bf16 runs that round at
    different places differ from fp32 by about as much (fastft keeps the adapters in bf16, peft in fp32: observed
    ratios 1.2 to 1.6). A dropped soft-cap moves the results by far more (checked below). Gemma 2 (its soft-caps,
    head size 256); the 16-bit casts of Gemma's norms are checked against transformers' module in test_rms_norm.py."""
    path = _bf16_rounded_checkpoint("gemma2", tmp_path)
    truth_model = load_baseline(path, load_in_4bit=False, dtype=torch.float32)
    randomize_lora(truth_model)
    with torch.no_grad():  # LoRA weights bf16-representable, so every model holds the same values
        for name, param in truth_model.named_parameters():
            if "lora_" in name:
                param.copy_(param.bfloat16().float())
    hf_bf16 = load_baseline(path, load_in_4bit=False, dtype=torch.bfloat16)
    copy_lora(truth_model, hf_bf16)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, load_in_4bit=False, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    peft.set_peft_model_state_dict(model, {k: v.bfloat16() for k, v in
                                           peft.get_peft_model_state_dict(truth_model).items()})

    ids, mask, labels = padded_batch()
    truth = _run(truth_model, ids, mask, labels)
    hf_errors = _errors(_run(hf_bf16, ids, mask, labels), truth)
    fastft_errors = _errors(_run(model, ids, mask, labels), truth)
    for name, hf_error in hf_errors.items():
        assert 0 < hf_error < 0.1, (name, hf_error)  # bf16 really rounds, and stays near the truth
        assert fastft_errors[name] <= 2 * hf_error + 2**-8, (name, fastft_errors[name], hf_error)
    assert hf_errors["logits"] > 2**-8 and hf_errors["lora_grads"] > 2**-8  # the 2x term is what binds

    # what the tolerance would catch: the logits without the final soft-cap
    model.get_base_model().config.final_logit_softcapping = None
    broken = _errors(_run(model, ids, mask, labels), truth)
    assert broken["logits"] > 2 * hf_errors["logits"] + 2**-8


def test_eager_fallback_matches_hf(tmp_path):
    """The route a GPU takes when fastft's kernel cannot serve a soft-capped model: transformers' eager attention
    (Gemma 2's, which caps the scores) under fastft's other kernels."""
    path = save_tiny_model("gemma2", tmp_path / "m")
    baseline = load_baseline(path, load_in_4bit=False)
    randomize_lora(baseline)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, load_in_4bit=False, dtype=torch.float32,
                                         attn_implementation="eager")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    copy_lora(baseline, model)
    assert model.config._attn_implementation == "eager"
    ids, mask, labels = padded_batch()
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    for name, expected in ref_grads.items():
        assert_close(grads[name], expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4, name=name)


def test_soft_capped_attention_routes(tmp_path, monkeypatch):
    """Only attentions that cap the scores: fastft's kernel, else eager (never SDPA or xformers, which would
    silently drop the cap); an explicit SDPA or xformers choice is refused."""
    config = transformers.AutoConfig.from_pretrained(save_tiny_model("gemma2", tmp_path / "m"))
    cpu = torch.device("cpu")
    assert fastft_attention.choose_attention(config, cpu, torch.float32) == ("fastft", None)
    monkeypatch.setattr(fastft_attention, "fastft_attention_supported", lambda config, device: "compute capability 7.0")
    name, log_line = fastft_attention.choose_attention(config, cpu, torch.float32)
    assert name == "eager" and "soft-capped" in log_line
    for choice in ("sdpa", "fastft_xformers"):
        with pytest.raises(ValueError, match="cannot soft-cap the attention scores"):
            fastft_attention.resolve_attention(config, cpu, torch.float32, choice)
    config3 = transformers.AutoConfig.from_pretrained(save_tiny_model("gemma3", tmp_path / "g3"))  # no cap
    assert fastft_attention.choose_attention(config3, cpu, torch.float32)[0] == "sdpa"

    from fastft.xformers_attention import xformers_attention

    q = torch.zeros(1, 2, 3, 256)
    with pytest.raises(ValueError, match="cannot soft-cap"):
        xformers_attention(None, q, q[:, :1], q[:, :1], None, scaling=0.1, softcap=50.0)


def test_generate_with_the_kv_cache_matches_hf(arch_path):
    """Greedy decoding with the cache: fastft's 4D-mask path (soft-capped for Gemma 2), the per-layer windows and
    RoPE bases, the capped logits."""
    _, path = arch_path
    baseline, model = load_pair(path, load_in_4bit=False)
    ids, mask, _ = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full and left-padded rows, as batched generation pads
    baseline.eval(), model.eval()
    expected = greedy_generate(baseline, ids, mask, new_tokens=4)
    got = greedy_generate(model, ids, mask, new_tokens=4)
    assert torch.equal(got, expected)


def test_multimodal_gemma3_checkpoint_is_refused(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (vision tower): a clear error naming the text-only route."""
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=128, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=300),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3.*text model only.*gemma3_text"):
        spec_for(config)
    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3"):
        FastModel.from_pretrained(str(tmp_path))


def test_documented_text_only_route_for_a_multimodal_gemma3(tmp_path):
    """The README's recipe: the language model of a Gemma3ForConditionalGeneration saved as a Gemma3ForCausalLM
    checkpoint computes the same text logits and loads in fastft."""
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=211),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "multimodal")
    # -- the recipe --
    multimodal = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "multimodal")
    text = transformers.Gemma3ForCausalLM(multimodal.config.text_config)
    text.model, text.lm_head = multimodal.model.language_model, multimodal.lm_head
    text.save_pretrained(tmp_path / "text")
    # --
    tiny_tokenizer().save_pretrained(tmp_path / "text")
    ids = padded_batch()[0]
    with use_engine("torch"):
        model, _ = FastModel.from_pretrained(tmp_path / "text", max_seq_length=64, dtype=torch.float32,
                                             load_in_4bit=False)
        with torch.no_grad():
            assert_close(model(input_ids=ids).logits, multimodal(input_ids=ids).logits, atol=1e-5, rtol=1e-5,
                         name="text logits")
    assert model.config.model_type == "gemma3_text"


def test_unsupported_gemma_options_are_refused():
    with pytest.raises(UnsupportedModelError, match="hidden_activation='gelu_pytorch_tanh'.*'gelu'"):
        spec_for(transformers.Gemma2Config(hidden_activation="gelu"))
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        spec_for(transformers.Gemma3TextConfig(use_bidirectional_attention=True))
    assert spec_for(transformers.Gemma3TextConfig()).qk_norm and not spec_for(transformers.Gemma2Config()).qk_norm


def test_save_merged_loads_in_plain_transformers(arch_path, tmp_path):
    """The merged 16-bit checkpoint (tied head, Gemma's config with its caps and layer types) loads without fastft and
    computes the LoRA model's logits. (Export, not kernels, under test: PyTorch engine.)"""
    _, path = arch_path
    with use_engine("torch"):
        model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        randomize_lora(model)
        model.eval()
        ids, mask, _ = padded_batch()
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).logits
        save_merged(model, tmp_path / "merged", dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(plain).__name__ == type(model.get_base_model()).__name__
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # the merge adds s*B@A to the dequantized weight in fp32: rounding of one extra add (~1e-7 relative)
    assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4, name="merged logits")

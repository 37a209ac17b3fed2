"""FastModel beyond numerical parity: saving, generation, bad input."""
import pathlib
import shutil

import peft
import pytest
import torch
import transformers
from kernel_testing import assert_close, greedy_generate
from tiny_models import bnb_config, keep_bnb_standard_path, load_baseline, padded_batch, randomize_lora, save_tiny_model

from fastft import FastModel, UnsupportedModelError, unpatch_model
from fastft.saving import save_merged


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))


def fast_lora_model(path, **kwargs):
    model, tokenizer = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32, **kwargs)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    model.eval()
    return model


def test_adapter_round_trip_through_plain_peft(qwen2_path, tmp_path):
    model = fast_lora_model(qwen2_path)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")

    # plain transformers + peft, no fastft patching involved
    base = transformers.AutoModelForCausalLM.from_pretrained(
        qwen2_path, dtype=torch.float32, quantization_config=bnb_config(), device_map="cpu",
        attn_implementation="eager")
    plain = peft.PeftModel.from_pretrained(keep_bnb_standard_path(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(ours[real], theirs[real], atol=2e-5, rtol=1e-5, name="logits")


def test_merged_16bit_export_matches(qwen2_path, tmp_path):
    model = fast_lora_model(qwen2_path)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    save_merged(model, tmp_path / "merged", dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # the merge adds s*B@A to the dequantized weight in fp32: rounding of one extra add (~1e-7 relative)
    assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4, name="merged logits")


def test_generate_matches_hf_greedy(qwen2_path):
    baseline = load_baseline(qwen2_path)
    randomize_lora(baseline)
    model = fast_lora_model(qwen2_path)
    peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(baseline))
    baseline.eval()
    ids, mask, _ = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full and left-padded rows, as batched generation pads
    assert torch.equal(greedy_generate(model, ids, mask), greedy_generate(baseline, ids, mask))


def test_patched_and_unpatched_models_coexist(qwen2_path):
    ids, mask, _ = padded_batch()
    patched, _ = FastModel.from_pretrained(qwen2_path, max_seq_length=64, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32,
                                                              quantization_config=bnb_config(), device_map="cpu")
    assert all("forward" not in module.__dict__ for module in plain.modules())
    with torch.no_grad():
        a = patched(input_ids=ids, attention_mask=mask).logits
        b = unpatch_model(patched)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(a[real], b[real], atol=2e-5, rtol=1e-5, name="patched vs unpatched")


def test_overlong_batch_is_a_clear_error(qwen2_path):
    model = fast_lora_model(qwen2_path)
    with pytest.raises(ValueError, match="max_seq_length=64"):
        model(input_ids=torch.zeros(1, 65, dtype=torch.long))


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*supported: gemma2, gemma3_text, llama, "):
        FastModel.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("dtype, error", [(torch.int8, TypeError), ("float64", TypeError)])
def test_wrong_dtype_is_a_clear_error(qwen2_path, dtype, error):
    with pytest.raises(error, match="dtype"):
        FastModel.from_pretrained(qwen2_path, dtype=dtype)


def test_lora_dropout_runs_the_fused_path(qwen2_path, monkeypatch, caplog):
    """lora_dropout > 0 is served by the fused kernels (peft's LoRA forward never runs, nothing warns about it):
    in eval mode the result equals the Hugging Face + peft model with the same adapter; in training the masks
    change the loss and every adapter gets a gradient. (test_model_parity.py checks training against peft with
    the same masks.)"""
    baseline = load_baseline(qwen2_path, lora_dropout=0.1)
    randomize_lora(baseline)
    ids, mask, labels = padded_batch()
    baseline.eval()
    with torch.no_grad():
        ref = baseline(input_ids=ids, attention_mask=mask).logits
    model, _ = FastModel.from_pretrained(qwen2_path, max_seq_length=64, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="fastft"):
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1, use_gradient_checkpointing=False)
        peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(baseline))

        def peft_forward(*args, **kwargs):
            raise AssertionError("peft's LoRA forward ran: the fused path did not serve lora_dropout")

        monkeypatch.setattr(peft.tuners.lora.bnb.Linear4bit, "forward", peft_forward)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            eval_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    assert not [r for r in caplog.records if "dropout" in r.getMessage() or "own forward" in r.getMessage()]
    real = mask.bool()
    assert_close(out[real], ref[real], atol=2e-5, rtol=1e-5, name="logits")
    assert (loss - eval_loss).abs() > 1e-4, "training mode applied no dropout"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_unsupported_transformers_version_names_the_range(monkeypatch, qwen2_path):
    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    with pytest.raises(ImportError, match=r"transformers>=5.17,<6"):
        FastModel.from_pretrained(qwen2_path)


def test_trl_without_the_fused_lm_head_path_names_the_range(monkeypatch):
    import trl.trainer.utils as trl_utils

    import fastft.trl_compat as trl_compat

    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(ImportError, match=r"trl>=1.16,<2.*no trl.trainer.utils._ChunkedLogProbFunction"):
        trl_compat.install()


def test_trl_without_the_dataset_preparation_hook_names_the_range(monkeypatch):
    import trl

    import fastft.trl_compat as trl_compat

    monkeypatch.delattr(trl.DPOTrainer, "_prepare_dataset")
    with pytest.raises(ImportError, match=r"trl>=1.16,<2.*no trl.DPOTrainer._prepare_dataset"):
        trl_compat.install()


def _lora_layer_names(peft_model):
    return sorted({name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")})


@pytest.mark.parametrize("target_modules, expected", [
    ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (r".*\.(q_proj|v_proj)", ["q_proj", "v_proj"]),  # a regex string: peft matches it against full names
    (("o_proj",), ["o_proj"]),
])
def test_get_peft_model_takes_peft_target_module_forms(qwen2_path, target_modules, expected):
    model, _ = FastModel.from_pretrained(qwen2_path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, target_modules=target_modules, use_gradient_checkpointing=False)
    assert _lora_layer_names(model) == expected


def test_second_get_peft_model_is_refused(qwen2_path):
    model, _ = FastModel.from_pretrained(qwen2_path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    for again in (model, model.get_base_model()):
        with pytest.raises(ValueError, match="already has LoRA adapters.*add_adapter"):
            FastModel.get_peft_model(again, r=4)
    assert isinstance(model.base_model.model, transformers.PreTrainedModel)  # nothing was nested


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lora_alpha=0), ValueError, "lora_alpha=0 .*gradient is exactly zero"),
    (dict(lora_alpha="16"), TypeError, "lora_alpha must be a finite number"),
    (dict(target_modules=["q_proj", "v_prj"]), ValueError, r"target_modules \['v_prj'\] match no module.*'v_proj'"),
    (dict(target_modules=5), TypeError, "target_modules must be"),
    (dict(r=4.0), TypeError, "r .*must be a positive int.*4.0"),
    (dict(r=0), ValueError, "r .*must be a positive int"),
])
def test_silent_or_obscure_lora_arguments_raise(qwen2_path, kwargs, error, match):
    model, _ = FastModel.from_pretrained(qwen2_path, max_seq_length=64, dtype=torch.float32)
    with pytest.raises(error, match=match):
        FastModel.get_peft_model(model, **{"r": 4, **kwargs})
    assert not any("lora" in name for name, _ in model.named_modules())


def _no_loading(*args, **kwargs):
    raise AssertionError("from_pretrained should have refused before loading anything")


@pytest.mark.parametrize("name", ["./no-such-model", "../no-such-model", "~/no-such-model", "/no/such/no-such-model",
                                  "models/no/no-such-model", pathlib.Path("no-such-model")])
def test_missing_local_path_is_refused_before_any_hub_lookup(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_loading)
    with pytest.raises(FileNotFoundError, match="model path .*no-such-model.* does not exist"):
        FastModel.from_pretrained(name)


def test_a_file_is_refused_naming_its_directory(qwen2_path, monkeypatch, tmp_path):
    """Issue 24.7: the path of a model's config.json was reported as a tokenizer error."""
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_loading)
    with pytest.raises(NotADirectoryError, match=f"is a file; .*the model's directory.*pass '{qwen2_path}'"):
        FastModel.from_pretrained(str(pathlib.Path(qwen2_path) / "config.json"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(NotADirectoryError, match=rf"from_pretrained\('{tmp_path}', gguf_file='model.gguf'\)"):
        FastModel.from_pretrained(tmp_path / "model.gguf")


def test_home_relative_path_is_expanded(qwen2_path, monkeypatch):
    monkeypatch.setenv("HOME", str(pathlib.Path(qwen2_path).parent))
    model, tokenizer = FastModel.from_pretrained("~/" + pathlib.Path(qwen2_path).name, max_seq_length=64)
    assert model.config.model_type == "qwen2" and tokenizer is not None


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # transformers builds an empty Qwen2 tokenizer; Llama's raises
def test_missing_tokenizer_fails_before_the_weights_load(arch, tmp_path, monkeypatch):
    path = pathlib.Path(save_tiny_model(arch, tmp_path / "full"))
    (tmp_path / "bare").mkdir()
    for file in path.iterdir():
        if "token" not in file.name and file.suffix != ".jinja":
            shutil.copy(file, tmp_path / "bare" / file.name)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_loading)
    with pytest.raises(ValueError, match="could not load a tokenizer(.|\n)*tokenizer.save_pretrained"):
        FastModel.from_pretrained(str(tmp_path / "bare"))


def test_max_seq_length_checks(qwen2_path):
    with pytest.raises(ValueError, match="max_seq_length must be a positive int, got True"):
        FastModel.from_pretrained(qwen2_path, max_seq_length=True)
    with pytest.warns(UserWarning, match="max_seq_length=512 exceeds the model's max_position_embeddings=256"):
        FastModel.from_pretrained(qwen2_path, max_seq_length=512)

"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (transformers' ``phi3``) beyond the shared parity tests of
test_model_parity.py (which run Phi-4-mini's RoPE, "phi3_longrope", there): plain Phi-3's fused q/k/v and gate/up
layers on fastft's kernels, LongRoPE's switch from short to long factors (one batch, packed batches, generation with
a cache across it), Phi-3-mini-4k's sliding window, bf16, and Phi's own dropouts (LoRA dropout on its fused layers:
test_model_parity.py).

Tolerances (fp32) as in test_model_parity.py: both sides dequantize the same NF4 values and differ only in summation
order (~1e-6 relative); a wrong RoPE factor, table or window moves the logits by > 1e-2. bf16: see
test_bf16_matches_hf_within_hfs_own_rounding.
"""
import peft
import pytest
import torch
from kernel_testing import assert_close
from test_model_parity import assert_grads_match, load_pair, packed_batch, train_step
from tiny_models import (
    PHI3_LORA_TARGETS,
    load_baseline,
    lora_grads,
    padded_batch,
    save_tiny_model,
)

import fastft.patch
from fastft import FastModel, UnsupportedModelError


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory):  # Phi-3-mini's shape: full rotary, default RoPE, untied head
    return save_tiny_model("phi3", tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="module")
def longrope_path(tmp_path_factory):  # Phi-4-mini's: partial rotary (48 of 64 dims), LongRoPE switching at 16
    return save_tiny_model("phi3_longrope", tmp_path_factory.mktemp("phi3_longrope"))


def test_fused_qkv_and_gate_up_run_on_fastfts_kernels_and_match_hf(phi3_path, monkeypatch):
    """Default targets are Phi-3's four linear layers; each runs fastft's fused path (one lora_linear on qkv_proj,
    lora_mlp_gate_up on gate_up_proj + down_proj), never peft's own forward, and the model equals transformers +
    peft in logits, loss and every LoRA gradient."""
    baseline, model = load_pair(phi3_path)  # FastModel.get_peft_model with its default target_modules
    targeted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert targeted == set(PHI3_LORA_TARGETS)
    ids, mask, labels = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        baseline.eval()
        ref_logits = baseline(input_ids=ids, attention_mask=mask).logits
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)

    calls = {"lora_linear": 0, "lora_mlp_gate_up": 0}
    for name in calls:
        def counted(*args, _real=getattr(fastft.patch, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(fastft.patch, name, counted)

    def peft_forward(*args, **kwargs):
        raise AssertionError("peft's LoRA forward ran: a Phi-3 projection left the fused path")

    monkeypatch.setattr(peft.tuners.lora.bnb.Linear4bit, "forward", peft_forward)
    loss, grads = train_step(model, ids, mask, labels)
    layers = model.config.num_hidden_layers
    assert calls == {"lora_linear": 2 * layers, "lora_mlp_gate_up": layers}  # qkv_proj and o_proj; the MLP
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5, name="logits")


def _tables(model, length):
    rotary = model.get_base_model().model.rotary_emb
    cos, _ = rotary(torch.zeros(1), torch.arange(length)[None])
    return cos[0]


def test_longrope_long_factors_and_packed_short_ones_match_hf(longrope_path):
    """transformers' LongRoPE takes the long factors for a whole batch once its largest position + 1 exceeds
    original_max_position_embeddings (16 here), else the short ones; fastft takes cos/sin from the model's own rotary
    module, so it follows: 2 rows of 21 tokens (long, one right-padded), and a packed row of 21 tokens whose two
    sequences stay within 16 positions (short)."""
    baseline, model = load_pair(longrope_path)
    assert model.config.rope_parameters["original_max_position_embeddings"] == 16
    # the two regimes differ: the tables at positions 0..11 move by far more than any tolerance here
    assert (_tables(model, 12) - _tables(model, 21)[:12]).abs().max() > 0.1
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 211, (2, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss, long factors")
    assert_grads_match(grads, ref_grads)

    position_ids = torch.cat([torch.arange(12), torch.arange(9)])[None]
    labels = ids[:1].clone()
    labels[0, [0, 12]] = -100
    baseline.train(), model.train()
    ref = baseline(input_ids=ids[:1], position_ids=position_ids, labels=labels, use_cache=False)
    out = model(input_ids=ids[:1], position_ids=position_ids, labels=labels, use_cache=False)
    assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6, name="loss, packed, short factors")
    baseline.zero_grad(), model.zero_grad()
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(lora_grads(model), lora_grads(baseline))


def test_generation_with_a_cache_across_the_longrope_switch_matches_hf(longrope_path):
    """Prompts of 11 tokens (one left-padded) and 10 new ones: the cached decoding crosses position 16, where
    Phi-3's prepare_inputs_for_generation drops the cache and recomputes the whole sequence with the long factors.
    fastft generates the same tokens with the same logits at every step."""
    baseline, model = load_pair(longrope_path)
    baseline.eval(), model.eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(4, 211, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref, ours = baseline.generate(**kwargs), model.generate(**kwargs)
    assert ref.sequences.shape[1] == 21 and torch.equal(ours.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, ref.logits)):
        assert_close(a, b, atol=2e-5 * b.abs().max().item(), rtol=1e-5, name=f"logits of new token {step}")


def test_sliding_window_matches_hf(tmp_path):
    """Phi-3-mini-4k attends within config.sliding_window (3 here) in every layer: padded and packed batches on
    fastft's kernel equal transformers' eager attention with its sliding-window mask (the same off-by-one: a token
    sees itself and the 2 before it)."""
    path = save_tiny_model("phi3_sliding", tmp_path / "m")
    baseline, model = load_pair(path)
    ids, mask, labels = padded_batch()
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)

    ids, position_ids, labels, _ = packed_batch()
    ref = baseline(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    out = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    assert_close(out, ref, atol=1e-6, rtol=1e-6, name="packed loss")
    # the window matters here: attending one token further back moves the loss beyond the tolerance
    model.get_base_model().config.sliding_window = 4
    with torch.no_grad():
        wider = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    assert (wider - ref).abs() > 1e-4


def _bf16_pair(path, lora_state):
    """Transformers + peft and fastft in bf16 (4-bit weights, bf16 compute and adapters, as TRL trains them)."""
    baseline = load_baseline(path, dtype=torch.bfloat16)
    for name, param in baseline.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    for m in (baseline, model):
        peft.set_peft_model_state_dict(m, lora_state)
    return baseline, model


def _relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def test_bf16_matches_hf_within_hfs_own_rounding(phi3_path):
    """bf16: fastft and transformers + peft round at different points, so neither equals the other. Both are
    compared with the same model in fp32 (the same NF4 codes and LoRA weights, the latter bf16 values): fastft's
    relative error in the logits, the loss and every LoRA gradient may be at most twice the baseline's own, plus 2
    bf16 ulps (2^-7) for a quantity the baseline happens to get nearly exact. A real bug (a dropped term, a wrong
    RoPE factor or window) is an O(1) error."""
    baseline32, model32 = load_pair(phi3_path)
    with torch.no_grad():  # LoRA weights that bf16 holds exactly
        for name, param in baseline32.named_parameters():
            if "lora_" in name:
                param.copy_(param.bfloat16().float())
    state = peft.get_peft_model_state_dict(baseline32)
    baseline16, model16 = _bf16_pair(phi3_path, state)
    ids, mask, labels = padded_batch()
    real = mask.bool()
    results = {}
    for name, m in (("reference", baseline32), ("hf", baseline16), ("fastft", model16)):
        with torch.no_grad():
            m.eval()
            logits = m(input_ids=ids, attention_mask=mask).logits[real]
        loss, grads = train_step(m, ids, mask, labels)
        results[name] = (logits, loss, grads)
    ref_logits, ref_loss, ref_grads = results["reference"]
    floor = 2 ** -7

    def errors(name):
        logits, loss, grads = results[name]
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        return {"logits": _relative_error(logits, ref_logits), "loss": _relative_error(loss, ref_loss),
                **{key: _relative_error(grads[key], ref_grads[key]) for key in ref_grads}}

    hf, ours = errors("hf"), errors("fastft")
    assert 0 < hf["logits"] < 0.05, hf  # the baseline itself is bf16-accurate, not exact
    for key in hf:
        assert ours[key] <= 2 * hf[key] + floor, f"{key}: fastft's bf16 error {ours[key]:.3e}, hf's {hf[key]:.3e}"


def test_resid_dropout_is_applied_as_in_hf(tmp_path):
    """resid_pdrop runs in Phi3DecoderLayer's own forward (its nn.Dropout modules), which fastft leaves in place: in
    training, with the same seed, the same elements are dropped on both sides."""
    path = save_tiny_model("phi3", tmp_path / "m", resid_pdrop=0.25)
    baseline, model = load_pair(path)
    ids, mask, labels = padded_batch()
    torch.manual_seed(5)
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    torch.manual_seed(5)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)
    torch.manual_seed(6)
    with torch.no_grad():
        other = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert (other - loss).abs() > 1e-3, "another seed should drop other elements"


def test_attention_dropout_routes_attention_to_sdpa(tmp_path, caplog):
    """fastft's attention kernel has no attention dropout: a Phi config that sets one gets PyTorch SDPA (which
    applies it), with a log line saying why; asking for fastft's kernel then fails in a training forward."""
    path = save_tiny_model("phi3", tmp_path / "m", attention_dropout=0.1)
    with caplog.at_level("WARNING", logger="fastft"):
        model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa" and "attention_dropout=0.1" in caplog.text
    forced, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32, attn_implementation="fastft")
    ids, mask, labels = padded_batch()
    with pytest.raises(ValueError, match="no attention dropout"):
        forced.train()(input_ids=ids, attention_mask=mask, labels=labels)


def test_llama_names_and_other_activations_are_refused(phi3_path, tmp_path):
    model, _ = FastModel.from_pretrained(phi3_path, max_seq_length=64, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\['q_proj', 'gate_proj'\] match no module.*'gate_up_proj'.*'qkv_proj'"):
        FastModel.get_peft_model(model, target_modules=["q_proj", "o_proj", "gate_proj"])
    gelu = save_tiny_model("phi3", tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        FastModel.from_pretrained(gelu, max_seq_length=64, dtype=torch.float32)


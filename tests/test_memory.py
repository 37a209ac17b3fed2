"""Memory accounting (fastft.memory): a training step on meta tensors counts what a real run allocates.

The references are independent of the accounting machinery: the live tensor bytes of the same step run for
real on the CPU (fastft's kernels interpreted), closed-form sizes of the resident tensors, and hand-written
checks of the simulated GPU's bookkeeping.
"""
from __future__ import annotations

import copy
import gc
import math
import re

import pytest
import torch
import transformers

from fastft.memory import headroom
from fastft.memory.accounting import account_step, measure_step_on_cpu
from fastft.memory.estimate import estimate_memory, largest_fitting, max_context
from fastft.memory.simulated_gpu import UnknownValueError, simulated_gpu
from fastft.memory.training_step import ALL_LINEAR, StepSetup, build_model, make_batch, make_optimizer, train_step

GIB = 2**30
# in/out features multiples of 64: bitsandbytes' CPU 4-bit matmul is only right for those (HF-STACK-NOTES.md)
TINY_LLAMA = transformers.LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=4096)
TINY_QWEN2 = transformers.Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                                      tie_word_embeddings=True, use_sliding_window=False)
# Phi-3: fused qkv_proj (256 rows) and gate_up_proj (384 rows)
TINY_PHI3 = transformers.Phi3Config(vocab_size=384, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------
# The accounting against a real run


@pytest.mark.parametrize("checkpointing", ["on", "off"])
@pytest.mark.parametrize("batch", ["plain", "padded", "packed"])
@pytest.mark.parametrize("contender", ["fastft", "hf"])
def test_accounted_step_equals_live_bytes_measured_on_cpu(contender, batch, checkpointing):
    """The issue's validation: at a small size the accounted peak equals the live tensor bytes of the same
    step run for real on the CPU within 5% (observed: equal to 16 bytes); 1% is asserted, which a missed
    [tokens, hidden] tensor (about 1% of this step) would already fail. fp32: the GPU code path and the CPU
    one then allocate the same buffers (16-bit operands get fp32 copies on the CPU)."""
    setup = StepSetup(contender=contender, seq_len=64, batch_size=2, batch=batch, checkpointing=checkpointing,
                      dtype=torch.float32)
    accounted = account_step(TINY_LLAMA, setup, sm_count=1, cuda_workspaces=False)  # CPU: 4 rms_norm programs
    measured = measure_step_on_cpu(TINY_LLAMA, setup)
    assert accounted.resident == measured.resident
    assert accounted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    assert accounted.peak_phase == measured.peak_phase


@pytest.mark.parametrize("contender", ["fastft", "hf"])
def test_accounted_trl_loss_path_equals_measured_on_cpu(contender):
    """TRL's fused lm-head path (SFTTrainer's loss) for both contenders, on the tied-embedding Qwen2."""
    setup = StepSetup(contender=contender, seq_len=48, batch_size=2, batch="padded", loss="trl", dtype=torch.float32)
    accounted = account_step(TINY_QWEN2, setup, sm_count=1, cuda_workspaces=False)
    measured = measure_step_on_cpu(TINY_QWEN2, setup)
    assert accounted.resident == measured.resident
    assert accounted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)


def test_accounted_phi3_step_equals_measured_on_cpu():
    """Phi-3's fused projections (lora_linear on qkv_proj split into q, k, v; lora_mlp_gate_up) are accounted as they
    run, with adapters on its four linear layers by default (fp32 adapters here: 4 bytes a weight). (The hf
    contender's Phi-3 step is not validated this way: transformers hands SDPA q/k/v as views into one qkv output,
    and the CPU flash attention standing in for CUDA's then writes its output [B, H, T, D]-contiguous, which
    sdpa_attention_forward copies (+48 KiB here); CUDA's memory-efficient kernel, as accounted, writes [B, T, H, D].)"""
    setup = StepSetup(contender="fastft", seq_len=48, batch_size=2, batch="padded", dtype=torch.float32)
    accounted = account_step(TINY_PHI3, setup, sm_count=1, cuda_workspaces=False)
    measured = measure_step_on_cpu(TINY_PHI3, setup)
    assert accounted.resident == measured.resident
    assert accounted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    shapes = {"qkv_proj": (256, 128), "o_proj": (128, 128), "gate_up_proj": (384, 128), "down_proj": (128, 192)}
    lora = TINY_PHI3.num_hidden_layers * sum(setup.r * (o + i) * 4 for o, i in shapes.values())
    assert accounted.resident["lora_weights"] == lora
    # fastft's one fp32 dequantization buffer holds the largest weight, the fused [2I, H] gate_up
    assert accounted.resident["workspaces"] == 384 * 128 * 4


# ---------------------------------------------------------------------------------------------
# Resident memory in closed form


def _nf4_bytes(n: int) -> int:
    """bitsandbytes NF4 with double quantization: packed codes, uint8 block scales, fp32 scales of those
    (blocks of 256), the fp32 offset, the 16-entry NF4 table and a copy of the 256-entry dynamic table."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4


def _linear_shapes(config):
    H, inter = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
            "gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2-bias-tied"])
@pytest.mark.parametrize("contender", ["fastft", "hf"])
def test_resident_breakdown_matches_closed_form(config, contender, dtype):
    r = 8
    setup = StepSetup(contender=contender, seq_len=32, r=r, dtype=dtype)
    resident = account_step(config, setup).resident
    shapes, L, H, V = _linear_shapes(config), config.num_hidden_layers, config.hidden_size, config.vocab_size
    d = getattr(config, "head_dim", None) or H // config.num_attention_heads
    embeddings = V * H * 2 * (1 if config.tie_word_embeddings else 2)
    biases = L * (shapes["q_proj"][0] + 2 * shapes["k_proj"][0]) * 2 if config.model_type == "qwen2" else 0
    # 16-bit, as TRL casts them, but fastft's fp32 master weights of an fp16 model (fastft/master_weights.py)
    lora_bytes = 4 if (contender, dtype) == ("fastft", torch.float16) else 2
    lora = L * sum(r * (out_f + in_f) * lora_bytes for out_f, in_f in shapes.values())
    lora_params = L * 2 * len(shapes)
    assert resident["weights_4bit"] == L * sum(_nf4_bytes(o * i) for o, i in shapes.values())
    rope_buffers = 2 * d // 2 * 4  # RoPE inv_freq and original_inv_freq, fp32
    assert resident["weights_16bit"] == embeddings + (2 * L + 1) * H * 2 + biases + rope_buffers
    assert resident["lora_weights"] == resident["lora_grads"] == lora
    assert resident["optimizer_state"] == 2 * lora + 4 * lora_params  # fused AdamW: two moments + fp32 step
    qkv = (shapes["q_proj"][0] + 2 * shapes["k_proj"][0]) * H  # lora_qkv dequantizes [W_q; W_k; W_v] at once
    largest = max(qkv, *(o * i for o, i in shapes.values()))
    assert resident["workspaces"] == (2 * largest if contender == "fastft" else 0)  # one 16-bit dequant buffer


# ---------------------------------------------------------------------------------------------
# What the accounting found and guards


def _live_after_forward(config, setup) -> int:
    with simulated_gpu() as gpu:
        model = build_model(config, setup, torch.device("meta"))
        batch = make_batch(setup, config.vocab_size, torch.device("meta"))
        gc.collect()
        before = gpu.live
        loss = model(**batch).loss
        gc.collect()
        kept = gpu.live - before
        del loss
    return kept


def test_checkpointing_keeps_one_hidden_state_per_layer():
    """With gradient checkpointing, each extra layer costs exactly its input hidden state until the backward.
    (The attention's autograd context used to keep q alive as well: twice this.)"""
    setup = StepSetup(contender="fastft", seq_len=256, checkpointing="on")
    deeper = transformers.LlamaConfig(**{**TINY_LLAMA.to_dict(), "num_hidden_layers": 5})
    per_layer = (_live_after_forward(deeper, setup) - _live_after_forward(TINY_LLAMA, setup)) / 3
    assert per_layer == 256 * TINY_LLAMA.hidden_size * 2


@pytest.mark.parametrize("contender", ["fastft", "hf"])
@pytest.mark.parametrize("batch", ["plain", "packed"])
def test_accounted_step_leaves_no_tensor_in_a_reference_cycle(contender, batch):
    """A tensor in a reference cycle is freed whenever the garbage collector runs, so the peak would depend
    on its timing (an exception kept in a frame did that once)."""
    setup = StepSetup(contender=contender, seq_len=64, batch=batch, loss="trl", checkpointing="offload")
    with simulated_gpu():
        model = build_model(TINY_LLAMA, setup, torch.device("meta"))
        optimizer = make_optimizer(model)
        batch = make_batch(setup, TINY_LLAMA.vocab_size, torch.device("meta"))
        gc.collect()
        gc.disable()
        try:
            train_step(model, optimizer, batch)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            in_cycles = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert in_cycles == []


@pytest.mark.parametrize("contender", ["fastft", "hf"])
def test_offloaded_checkpoints_leave_the_gpu(contender):
    """Offloaded checkpoints are host copies: the forward keeps no layer input on the (simulated) GPU but the
    first, the embedding output, which autograd holds anyway as the leaf ``enable_input_require_grads`` makes."""
    config = transformers.LlamaConfig(**{**TINY_LLAMA.to_dict(), "num_hidden_layers": 4})
    on = _live_after_forward(config, StepSetup(contender=contender, seq_len=256, checkpointing="on"))
    off = _live_after_forward(config, StepSetup(contender=contender, seq_len=256, checkpointing="offload"))
    assert on - off == (4 - 1) * 256 * config.hidden_size * 2


def _with_and_without_dropout(config, sm_count=132, **setup):
    """(step without, step with lora_dropout=0.05, bytes kept after the forward without, with)."""
    steps, kept = [], []
    for p in (0.0, 0.05):
        step = StepSetup(lora_dropout=p, **setup)
        steps.append(account_step(config, step, sm_count=sm_count))
        kept.append(_live_after_forward(config, step))
    return (*steps, *kept)


@pytest.mark.parametrize("checkpointing", ["on", "off"])
def test_lora_dropout_keeps_no_token_sized_tensor(checkpointing):
    """fastft draws its LoRA dropout masks inside the kernels (issue 18): with lora_dropout=0.05 the forward keeps
    exactly what it keeps without, the resident bytes are the same, and the peak grows at most by dA's fp32
    partial sums over token splits (kernels/lora_dropout.py), which the GPU's size bounds, not the tokens; on a
    1-SM GPU (no splits) not at all. (Without checkpointing the peak is the end of the forward, where all the
    activations are kept: there the kept bytes are the check.) peft's own dropout (the hf contender) keeps a
    dropped copy of x per projection, which the same accounting shows."""
    H, r, sms = TINY_LLAMA.hidden_size, StepSetup().r, 4
    # dA's partial sums on the simulated sm_90 (bf16: 64 x 64 tiles, the rank padded to 16): cdiv(2 * SMs, tiles
    # along in) token splits of [r, in] fp32, then their fp32 sum and its bf16 copy, for the widest input.
    bound = max((-(-2 * sms // (k // 64)) + 1) * r * k * 4 + r * k * 2
                for k in (TINY_LLAMA.hidden_size, TINY_LLAMA.intermediate_size))
    for seq_len in (512, 1024):
        plain, dropped, kept_plain, kept_dropped = _with_and_without_dropout(
            TINY_LLAMA, sm_count=sms, contender="fastft", seq_len=seq_len, checkpointing=checkpointing)
        assert kept_dropped == kept_plain, "the forward keeps more for the backward with dropout"
        assert dropped.resident == plain.resident
        assert dropped.peak_bytes - plain.peak_bytes <= bound < seq_len * H * 2  # (less, even: one mm fewer)
    for seq_len in (256, 1024):
        plain, dropped, _, _ = _with_and_without_dropout(TINY_LLAMA, sm_count=1, contender="fastft", seq_len=seq_len,
                                                         checkpointing=checkpointing)
        assert dropped.peak_bytes == plain.peak_bytes

    if checkpointing == "off":
        _, _, kept_plain, kept_dropped = _with_and_without_dropout(TINY_LLAMA, contender="hf", seq_len=256,
                                                                   checkpointing="off")
        projections = TINY_LLAMA.num_hidden_layers * len(ALL_LINEAR)
        assert kept_dropped - kept_plain >= projections * 256 * H * 2  # the accounting does see dropped copies


# ---------------------------------------------------------------------------------------------
# The simulated GPU's bookkeeping


def test_simulated_gpu_counts_storages_once_and_uncounts_them_when_freed():
    with simulated_gpu() as gpu:
        start = gpu.live
        a = torch.empty(1000, 100, device="meta", dtype=torch.bfloat16)
        view = a[10:20].view(-1)
        assert gpu.live - start == 200_000
        b = a * 2
        assert gpu.live - start == 400_000 and gpu.peak - start >= 400_000
        del a
        gc.collect()
        assert gpu.live - start == 400_000  # the view keeps a's storage
        del view, b
        gc.collect()
        assert gpu.live == start


def test_simulated_gpu_keeps_the_values_of_small_integer_tensors():
    with simulated_gpu() as gpu:
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], device="meta")
        keep = mask.flatten().nonzero().flatten()  # data-dependent shape
        assert keep.device.type == "meta" and gpu.value(keep).tolist() == [0, 1, 2, 4, 5]
        assert int(mask.sum(-1).max()) == 3
        positions = torch.arange(6, device="meta").view(1, -1)
        positions[:, 3:] -= 3  # in place, through a view
        assert gpu.value(positions).tolist() == [[0, 1, 2, 0, 1, 2]]
        x = torch.empty(2, 4, 8, device="meta")
        assert x[mask.bool()].shape == (5, 8)  # a boolean mask of known values selects known rows
        assert not gpu.has_value(x * 2)  # floating point data is never computed


def test_simulated_gpu_refuses_to_guess_unknown_values():
    with simulated_gpu():
        x = torch.empty(4, 8, device="meta")
        with pytest.raises(UnknownValueError, match="only knows the shape"):
            (x > 0).nonzero()
        with pytest.raises(UnknownValueError):
            float(x.sum())
        labels = torch.tensor([1, 2, 3], device="meta")
        labels.copy_(x[0, :3].long())  # overwritten with unknown data: its values are gone
        with pytest.raises(UnknownValueError):
            int(labels.max())


def test_simulated_gpu_host_copies_are_not_counted_and_come_back_as_new_storage():
    with simulated_gpu() as gpu:
        start = gpu.live
        h = torch.empty(1024, 1024, device="meta")
        host = torch.empty(h.shape, pin_memory=True)
        host.copy_(h, non_blocking=True)  # as torch.autograd.graph.save_on_cpu packs
        assert host.device.type == "cpu" and not gpu.has_value(host)
        del h
        gc.collect()
        assert gpu.live == start
        back = host.to("meta", non_blocking=True)
        assert gpu.live - start == 4 * 1024 * 1024 and not gpu.has_value(back)


# ---------------------------------------------------------------------------------------------
# The figures fastft claims (accounted at full size, a few seconds each)


def test_llama31_8b_at_2048_tokens_peaks_under_7_gib_and_under_hf():
    fastft = estimate_memory("llama-3.1-8b", 2048, r=16, loss="labels")
    hf = estimate_memory("llama-3.1-8b", 2048, r=16, loss="labels", contender="hf")
    assert 5.5 < fastft.resident_gb < fastft.peak_gb <= 7.0
    assert fastft.peak_gb < 0.8 * hf.peak_gb


def test_llama31_8b_r32_max_context_targets():
    """More than Unsloth publishes for 24 GB and 80 GB (78,475 and 342,733 tokens) with the headroom kept back (the
    raw figures, against the whole card, were 100,000 and 400,000 or more), beyond the model's trained context of
    131,072 positions when asked."""
    settings = dict(r=32, use_gradient_checkpointing="offload", beyond_trained_context=True)
    assert max_context("llama-3.1-8b", 24, **settings) > 78_475
    assert max_context("llama-3.1-8b", 80, **settings) > 342_733


def test_phi4_preset_adapts_its_four_fused_layers():
    """fastft-memory's phi-4: Phi-3's architecture at 14B, adapters on qkv_proj, o_proj, gate_up_proj and down_proj
    (bf16, r=16), and the one dequantization buffer sized for the fused [2I, H] gate_up weight."""
    estimate = estimate_memory("microsoft/phi-4", 2048, r=16)
    L, H, inter, q, kv = 40, 5120, 17920, 40 * 128, 10 * 128
    shapes = [(q + 2 * kv, H), (H, q), (2 * inter, H), (H, inter)]
    assert estimate.resident["lora_weights"] * GIB == L * sum(16 * (o + i) * 2 for o, i in shapes)
    assert estimate.resident["workspaces"] * GIB == 2 * inter * H * 2
    assert estimate.peak_gb > estimate.resident_gb


def test_gemma2_9b_preset_adapts_seven_layers_at_head_size_256():
    """fastft-memory's gemma-2-9b: adapters on the seven linear layers with q/k/v sized by the head size 256 (not
    hidden / heads = 224), bf16, r=16; the dequantization buffer sized for the largest weight, [I, H]; the tied
    256k-entry embedding counted once among the 16-bit tensors."""
    estimate = estimate_memory("google/gemma-2-9b", 2048, r=16)
    L, H, inter, q, kv, vocab = 42, 3584, 14336, 16 * 256, 8 * 256, 256000
    shapes = [(q, H), (kv, H), (kv, H), (H, q), (inter, H), (inter, H), (H, inter)]
    assert estimate.resident["lora_weights"] * GIB == L * sum(16 * (o + i) * 2 for o, i in shapes)
    assert estimate.resident["workspaces"] * GIB == inter * H * 2
    sixteen_bit = estimate.resident["weights_16bit"] * GIB
    assert vocab * H * 2 <= sixteen_bit < 2 * vocab * H * 2  # one embedding, tied to the head
    assert estimate.peak_gb > estimate.resident_gb


# ---------------------------------------------------------------------------------------------
# The user-facing answers


def test_largest_fitting_finds_the_limit_of_linear_and_stepped_peaks():
    calls = []

    def linear(tokens):
        calls.append(tokens)
        return 5e9 + 160_000 * tokens

    assert largest_fitting(linear, 24 * GIB, 128, 1 << 21) == (24 * GIB - 5e9) // 160_000 // 128 * 128
    assert len(calls) <= 12
    stepped = lambda tokens: 1e9 + 1e5 * (tokens // 4096 * 4096)  # noqa: E731
    expected = max(t for t in range(128, 1 << 17, 128) if stepped(t) <= 7e9)
    assert largest_fitting(stepped, 7e9, 128, 1 << 17) == expected
    assert largest_fitting(linear, 1e9, 128, 1 << 21) == 0  # not even 128 tokens
    assert largest_fitting(lambda t: 1.0, 2.0, 128, 1000) == 896  # capped at the upper bound


def test_estimate_memory_reads_a_config_directory_and_a_model(tmp_path):
    TINY_LLAMA.save_pretrained(tmp_path)
    from_dir = estimate_memory(str(tmp_path), 128)
    from_config = estimate_memory(TINY_LLAMA, 128)
    assert from_dir.peak_gb == from_config.peak_gb > from_config.resident_gb > 0
    assert estimate_memory(TINY_LLAMA, 512).peak_gb > from_config.peak_gb
    assert "peak (max_memory_allocated, accounted)" in from_config.breakdown()


@pytest.mark.parametrize("model, message", [
    ("./no-such-dir", "no such directory"),
    ("someone/not-downloaded-model", "not in the offline Hugging Face cache"),
])
def test_estimate_memory_names_a_model_it_cannot_read(model, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=message):
        estimate_memory(model, 128)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_seq_length=0), "max_seq_length must be a positive int"),
    (dict(max_seq_length=True), "max_seq_length must be a positive int"),
    (dict(max_seq_length=64, batch_size=-1), "batch_size must be a positive int"),
    (dict(max_seq_length=64, dtype="float32"), "dtype must be bfloat16 or float16"),
    (dict(max_seq_length=64, use_gradient_checkpointing="sometimes"), "use_gradient_checkpointing must be"),
])
def test_estimate_memory_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(TINY_LLAMA, **kwargs)


def test_cli_answers_fits_does_not_fit_and_too_small(tmp_path, capsys):
    from fastft.memory.cli import main

    TINY_LLAMA.save_pretrained(tmp_path)
    need = estimate_memory(TINY_LLAMA, 256)
    card = headroom.card_gib_for  # the card whose usable memory is the given peak
    assert main([str(tmp_path), "--seq-len", "256", "--vram", f"{card(need.peak_gb * 1.5):.6f}"]) == 0
    out = capsys.readouterr().out
    assert "accounted" in out and "fits" in out and "longest sequence that fits" in out
    between = card((need.peak_gb + need.resident_gb) / 2)
    assert main([str(tmp_path), "--seq-len", "256", "--vram", f"{between:.6f}"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main([str(tmp_path), "--vram", f"{card(need.resident_gb / 2):.6f}"]) == 1
    assert "alone need" in capsys.readouterr().out
    assert main(["./no-such-dir", "--vram", "24"]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--seq-len", "-5"])


def _positions(config, positions: int):
    config = copy.deepcopy(config)
    config.max_position_embeddings = positions
    return config


def test_max_context_stops_at_the_trained_context_unless_asked():
    """Issue 24.7: a model of 256 positions was reported to fit 1,920 tokens."""
    short = _positions(TINY_LLAMA, 256)
    vram = headroom.card_gib_for(estimate_memory(short, 1024).peak_gb)  # the accounting is not bound by the positions
    assert max_context(short, vram) == 256
    assert max_context(short, vram, beyond_trained_context=True) == 1024


def test_max_context_and_fits_keep_the_headroom_back_unless_asked_for_the_raw_figure():
    """Issue 25.5: the longest context was the one whose accounted peak filled the whole card."""
    peak = estimate_memory(TINY_LLAMA, 1024).peak_gb
    between = (peak + estimate_memory(TINY_LLAMA, 1152).peak_gb) / 2
    card = headroom.card_gib_for(between)  # usable: between the peaks of 1,024 and 1,152 tokens
    assert headroom.usable_gib(card) == pytest.approx(between, rel=1e-9)
    assert card - between == pytest.approx(headroom.CUDA_CONTEXT_GIB + headroom.FRAGMENTATION_FRACTION * card)
    assert max_context(TINY_LLAMA, card) == 1024
    assert max_context(TINY_LLAMA, [card]) == {card: 1024}
    assert max_context(TINY_LLAMA, card, headroom=False) == 4096  # the raw figure: the whole card, up to 4,096
    assert max_context(TINY_LLAMA, headroom.CUDA_CONTEXT_GIB) == 0  # the context takes the card: nothing fits
    estimate = estimate_memory(TINY_LLAMA, 1024)
    assert estimate.fits(card) and not estimate.fits(headroom.card_gib_for(peak) * 0.999)
    assert estimate.fits(peak * 1.001, headroom=False) and not estimate.fits(peak * 1.001)


def test_cli_says_which_figure_it_shows_and_raw_compares_with_the_whole_card(tmp_path, capsys):
    from fastft.memory.cli import main

    TINY_LLAMA.save_pretrained(tmp_path)
    vram = round(estimate_memory(TINY_LLAMA, 4096).peak_gb * 1.01, 6)  # the whole card holds 4,096 tokens; its
    assert vram < headroom.CUDA_CONTEXT_GIB                              # usable memory, nothing
    assert main([str(tmp_path), "--seq-len", "256", "--vram", str(vram)]) == 1
    out = capsys.readouterr().out
    assert f"card, 0.00 GiB usable after the {headroom.describe()}; --raw for the whole card" in out
    assert "does NOT fit" in out
    assert main([str(tmp_path), "--seq-len", "256", "--vram", str(vram), "--raw"]) == 0
    out = capsys.readouterr().out
    assert "raw: the accounted peak against the whole" in out and "fits" in out
    longest = max_context(TINY_LLAMA, vram, headroom=False, beyond_trained_context=True)
    assert longest >= 4096
    assert re.search(rf"longest sequence that fits {vram:g} GiB \([0-9.]+ GiB usable\) at batch 1: {longest:,} tokens",
                     out)


def test_the_headroom_figures_live_in_one_place(monkeypatch):
    """The constants of fastft/memory/headroom.py are the only copy: the docstring, the README and the outputs state
    them from there, and no other module keeps its own margin (the auto plan's 8% was one)."""
    from pathlib import Path

    from fastft import checkpointing

    repo = Path(__file__).resolve().parent.parent
    context, fraction = f"{headroom.CUDA_CONTEXT_GIB:g} GiB", f"{headroom.FRAGMENTATION_FRACTION:.0%}"
    doc = " ".join(headroom.__doc__.split())
    assert f"CUDA_CONTEXT_GIB``, {context})" in doc and f"FRAGMENTATION_FRACTION``, {fraction} of the card)" in doc
    readme = " ".join((repo / "README.md").read_text().split())
    assert f"headroom of {context} for the CUDA context and {fraction} of the card" in readme
    assert readme.count("headroom of ") == readme.count(f"headroom of {context} for the CUDA context and {fraction}")
    table_cards = (8, 12, 16, 24, 40, 48, 80)  # the max-context table's, with the usable memory stated beside it
    assert (" / ".join(f"{headroom.usable_gib(c):.2f}" for c in table_cards) + " GiB usable on "
            + " / ".join(map(str, table_cards)) + " GiB") in readme
    for card in (24, 80):
        assert f"{card} GiB card leaves {headroom.usable_gib(card):.2f} GiB for the accounted peak" in readme \
            or f"an {card} GiB card {headroom.usable_gib(card):.2f} GiB" in readme
    margins = re.compile(r"(?<![\w.])(0?\.92|0?\.08|0?\.75)(?![\w.])")
    for path in [*(repo / "fastft" / "memory").glob("*.py"), repo / "fastft" / "checkpointing.py",
                 repo / "bench" / "memory.py"]:  # where an accounted figure meets a card
        if path.name != "headroom.py":
            assert not margins.search(path.read_text()), f"{path}: a margin of its own; use fastft.memory.headroom"
    # the auto plan: free memory (the context already taken) plus what is allocated, less the fraction only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * GIB)
    budget = checkpointing.gpu_budget_gb(torch.device("cuda", 0))
    assert budget == pytest.approx(32 * (1 - headroom.FRAGMENTATION_FRACTION), rel=1e-12)


@pytest.mark.parametrize("vram", [-1, 0, "abc", float("nan"), True, [], [24, -1]])
def test_max_context_refuses_what_is_not_a_size(vram):
    with pytest.raises(ValueError, match="vram_gb must be a positive number of GiB"):
        max_context(TINY_LLAMA, vram)


def test_estimate_and_max_context_share_the_accounting_bound(monkeypatch):
    import fastft.memory.estimate

    monkeypatch.setattr(fastft.memory.estimate, "MAX_ACCOUNTED_TOKENS", 1024)
    with pytest.raises(ValueError, match=r"simulates at most 1,024 tokens per step \(fastft.memory.estimate."
                                         r"MAX_ACCOUNTED_TOKENS\); max_seq_length x batch_size is 512 x 4 = 2,048"):
        estimate_memory(TINY_LLAMA, 512, batch_size=4)
    assert max_context(TINY_LLAMA, 1000, batch_size=2) == 512  # the search stops at the bound, over the batch
    with pytest.raises(ValueError, match="simulates at most 1,024 tokens per step"):
        max_context(TINY_LLAMA, 1000, upper=2048)


def test_cli_refuses_an_absurd_length_at_once_without_growing_host_memory(tmp_path):
    """Issue 24.5: --seq-len 1000000000 grew host memory by a gigabyte every 4 s until the OOM killer struck."""
    import subprocess
    import sys

    from kernel_testing import env_without_interpreter

    script = tmp_path / "absurd.py"
    script.write_text(
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a missing bound fails here, not the machine\n"
        "from fastft.memory.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "code = main(['qwen2.5-1.5b', '--seq-len', '1000000000'])\n"
        "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env_without_interpreter())
    assert result.returncode == 0, result.stderr[-3000:]
    code, grown_kib = map(int, result.stdout.split())
    assert code == 2
    assert result.stderr.strip().count("\n") == 0  # one line, no traceback
    assert "simulates at most 2,097,152 tokens per step" in result.stderr and "1,000,000,000" in result.stderr
    assert grown_kib < 64 * 1024  # the refusal allocates nothing token-sized (a 10^9-token batch: over 20 GB)


def test_cli_names_an_unsupported_architecture_in_one_line_and_the_trained_context(tmp_path, capsys):
    from fastft.memory.cli import main

    transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100).save_pretrained(tmp_path / "gpt2")
    assert main([str(tmp_path / "gpt2"), "--vram", "24"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "fastft does not support model_type='gpt2'; supported: gemma2, gemma3_text, llama" in err
    short = _positions(TINY_LLAMA, 256)
    short.save_pretrained(tmp_path / "short")
    vram = headroom.card_gib_for(estimate_memory(short, 1024).peak_gb * 1.001)
    assert main([str(tmp_path / "short"), "--seq-len", "512", "--vram", f"{vram:.6f}"]) == 0
    out = capsys.readouterr().out
    assert "note: 512 tokens is beyond the model's trained context of 256 positions" in out
    assert re.search(r"fits [0-9.]+ GiB \([0-9.]+ GiB usable\) at batch 1: 1,024 tokens of memory", out)
    assert "beyond the model's trained context: it has 256 positions (max_position_embeddings)" in out


# ---------------------------------------------------------------------------------------------
# bench/memory.py


def _bench_memory(*args, cwd):
    import subprocess
    import sys
    from pathlib import Path

    from kernel_testing import env_without_interpreter

    script = Path(__file__).resolve().parent.parent / "bench" / "memory.py"
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env_without_interpreter(CUDA_VISIBLE_DEVICES=""))


def test_bench_memory_writes_rows_max_context_markdown_and_plot(tmp_path):
    import json

    TINY_LLAMA.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    cards = [round(headroom.card_gib_for(peak_gb), 4) for peak_gb in (0.01, 0.02)]  # cards of 0.01 / 0.02 usable
    result = _bench_memory("--models", str(tmp_path / "tiny"), "--seq-lens", "64,256", "--batch-sizes", "1",
                           "--checkpointing", "on,offload", "--vram", ",".join(map(str, cards)), "--out-dir", str(out),
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = out.glob("memory-*.json")
    data = json.loads(path.read_text())
    assert (data["accounted"] is True and "not measured" in data["what"]
            and data["command"].startswith("bench/memory.py"))
    assert len(data["rows"]) == 2 * 2 * 2  # contenders x lengths x checkpointing
    for row in data["rows"]:
        assert row["peak_gb"] > row["resident_gb"] > 0 and set(row["resident"]) >= {"weights_4bit", "lora_weights"}
    fastft = [r for r in data["rows"] if r["contender"] == "fastft"]
    assert all(0 < r["peak_vs_hf"] < 2 for r in fastft)
    limits = {(m["contender"], m["r"], m["vram_gb"]): m["max_seq_len"] for m in data["max_context"]}
    assert len(limits) == 2 * 2 * 2 and all(t % 128 == 0 for t in limits.values())
    assert limits[("fastft", 16, cards[1])] > limits[("fastft", 16, cards[0])] > 0
    assert data["headroom"] == headroom.as_dict(applied=True) and all(m["headroom"] for m in data["max_context"])
    markdown = path.with_suffix(".md").read_text()
    assert "Accounted, not measured on a GPU" in markdown and "| fastft / hf |" in markdown
    usable = ", ".join(f"{card:g} → {headroom.usable_gib(card):.2f}" for card in cards)
    assert "**With headroom**" in markdown and f"GiB usable per card: {usable}." in markdown
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_bench_memory_gpu_check_needs_a_gpu(tmp_path):
    result = _bench_memory("--gpu-check", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_bench_memory_markdown_says_which_figure_its_table_shows():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("fastft_bench_memory_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    limit = {"contender": "fastft", "model": "m", "r": 32, "batch_size": 1, "checkpointing": "offload",
             "mlp_chunk_tokens": None, "loss": "trl", "fsdp_world_size": 1, "vram_gb": 24, "max_seq_len": 1024}
    data = {"date": "d", "command": "c", "torch": "t", "transformers": "t", "peft": "p", "bitsandbytes": "b",
            "trl": "t", "fastft": {"git_commit": "g"}, "vram_gb": [24], "rows": [], "max_context": [limit]}
    with_headroom = bench.markdown({**data, "headroom": headroom.as_dict(applied=True)})
    assert f"GiB usable per card: 24 → {headroom.usable_gib(24):.2f}." in with_headroom
    assert "| m | 32 | fastft | 1,024 |" in with_headroom and "Peak per setting" not in with_headroom  # no rows
    raw = bench.markdown({**data, "headroom": headroom.as_dict(applied=False)})
    assert "**Raw: the accounted peak against the whole card**" in raw and "usable" not in raw
    # the plot's lines: what each card leaves for the peak, or the whole card for raw (and older) results
    assert bench.card_lines({**data, "headroom": headroom.as_dict(applied=True)}) == [
        (headroom.usable_gib(24), f"24 GiB card: {headroom.usable_gib(24):.2f} usable ")]
    assert bench.card_lines({**data, "headroom": headroom.as_dict(applied=False)}) == bench.card_lines(data) == [
        (24, "24 GiB (whole card) ")]

"""A patched tiny Llama / Qwen2 / Mistral / Qwen3 / Phi-3 matches the unpatched Hugging Face + peft model: logits,
loss, LoRA grads. (Phi-3's own paths beyond these: test_phi.py.)

Tolerances: everything runs in fp32 on both sides; the 4-bit weights are dequantized to the same values
(table look-ups), so differences come only from summation order in matmuls/softmax (~1e-6 relative).
atol 2e-5 on logits of magnitude ~1 and rtol 1e-4 on gradients catch any dropped term, wrong mask, wrong
RoPE position or wrong LoRA scaling (those move results by >1e-2).
"""
import peft
import pytest
import torch
from kernel_testing import assert_close
from tiny_models import (
    LORA_TARGETS,
    PHI3_LORA_TARGETS,
    FixedDropoutMask,
    copy_lora,
    drawn_dropout_masks,
    load_baseline,
    lora_grads,
    padded_batch,
    randomize_lora,
    save_tiny_model,
)

from fastft import FastModel

# phi3_longrope: Phi-3's fused qkv_proj / gate_up_proj with Phi-4-mini's partial rotary + LongRoPE (short factors
# here: these batches stay within its original 16 positions; test_phi.py crosses the switch, and tests plain Phi-3)
ARCHS = ["llama", "qwen2", "llama31", "mistral", "qwen3", "phi3_longrope"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_path(request, tmp_path_factory):
    return request.param, save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def load_pair(path, load_in_4bit=True, gradient_checkpointing=False, lora_dropout=0.0):
    baseline = load_baseline(path, load_in_4bit=load_in_4bit, lora_dropout=lora_dropout)
    randomize_lora(baseline)
    model, tokenizer = FastModel.from_pretrained(path, max_seq_length=64, load_in_4bit=load_in_4bit,
                                                 dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                     use_gradient_checkpointing=gradient_checkpointing)
    copy_lora(baseline, model)
    return baseline, model


def train_step(model, ids, mask, labels, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


def assert_grads_match(got, expected):
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        scale = expected[name].abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero, the test would prove nothing"
        assert_close(got[name], expected[name], atol=1e-4 * scale, rtol=1e-4, name=name)


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
def test_logits_loss_and_lora_grads_match_hf(arch_path, load_in_4bit):
    _, path = arch_path
    baseline, model = load_pair(path, load_in_4bit)
    ids, mask, labels = padded_batch()

    with torch.no_grad():
        baseline.eval(), model.eval()
        ref_logits = baseline(input_ids=ids, attention_mask=mask).logits
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5, name="logits")

    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)


def packed_batch(vocab=211, seed=3):
    """One row holding sequences of 5, 6 and 2 tokens, positions restarting at each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, 13), generator=gen)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]])
    labels = ids.clone()
    labels[0, [0, 5, 11]] = -100  # the first token of each sequence has nothing before it
    cu = torch.tensor([0, 5, 11, 13], dtype=torch.int32)
    return ids, position_ids, labels, cu


@pytest.mark.parametrize("with_cu_seqlens", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_sequences_match_hf(arch_path, with_cu_seqlens):
    """Padding-free batches: no token may attend across a sequence boundary. The baseline sees only the
    restarting position_ids (transformers builds a block-diagonal mask from them); fastft is fed either
    the same, or the cu_seq_lens a padding-free collator sends."""
    _, path = arch_path
    baseline, model = load_pair(path)
    ids, position_ids, labels, cu = packed_batch()
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6) if with_cu_seqlens else {}

    baseline.train(), model.train()
    # use_cache=False as in training: with a cache transformers does not look for packed sequences
    ref = baseline(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False, **extra)
    assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6, name="loss")
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(lora_grads(model), lora_grads(baseline))

    # Attending across the boundaries (same positions, no packing) moves the loss by more than the
    # tolerance above, so the comparison can fail.
    with torch.no_grad():
        crossing = baseline(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=True).loss
    assert (crossing - ref.loss).abs() > 1e-5


def test_packing_metadata_is_derived_once_per_forward(tmp_path, monkeypatch):
    """Unpadding indices and cu_seqlens cost a device-to-host sync; every layer receives the same mask /
    position_ids object, so the first layer derives them and the rest (and checkpointed recomputation in
    the backward) reuse them. Changing the tensor in place must not leave them stale."""
    import fastft.attention

    calls = {"padding_metadata": 0, "packing_metadata": 0}
    for name in calls:
        def counted(*args, _real=getattr(fastft.attention, name), _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(fastft.attention, name, counted)

    path = save_tiny_model("llama", tmp_path)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    assert model.config.num_hidden_layers >= 2
    model.train()
    ids, mask, labels = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ids, position_ids, labels, _ = packed_batch()
    model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss.backward()
    assert calls == {"padding_metadata": 1, "packing_metadata": 1}

    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        position_ids.copy_(torch.arange(13)[None])  # now one sequence of 13 tokens
        in_place = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        fresh = model(input_ids=ids, position_ids=torch.arange(13)[None], use_cache=False).logits
    assert_close(in_place, fresh, atol=0, rtol=0, name="logits after an in-place change of position_ids")
    assert (in_place - packed).abs().max() > 1e-3


def test_packing_metadata_without_nonzero_static(monkeypatch):
    """CUDA has nonzero_static from torch 2.6 only (setup.py accepts 2.4): before, the metadata takes nonzero (one
    more sync) and must be the same."""
    import fastft.attention as glue

    assert not glue._has_cuda_nonzero_static("2.5.1+cu124") and glue._has_cuda_nonzero_static("2.6.0")
    _, mask, _ = padded_batch()
    _, position_ids, _, _ = packed_batch()
    static = glue.padding_metadata(mask), glue.packing_metadata(position_ids)
    monkeypatch.setattr(glue, "NO_NONZERO_STATIC", {"cpu"})
    dynamic = glue.padding_metadata(mask), glue.packing_metadata(position_ids)
    assert static[0][0].numel() < mask.numel() and static[1].cu_seqlens.numel() > 2  # real padding and packing
    for a, b in zip((*static[0], *static[1]), (*dynamic[0], *dynamic[1])):
        assert (a == b).all() if torch.is_tensor(a) else a == b


def test_disable_adapter_and_ref_adapter(arch_path):
    """DPO's reference pass: adapters disabled, or a second adapter made active, read at call time."""
    _, path = arch_path
    baseline, model = load_pair(path)
    ids, mask, _ = padded_batch()
    real = mask.bool()
    baseline.eval(), model.eval()
    with torch.no_grad():
        with baseline.disable_adapter():
            ref_disabled = baseline(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
        enabled = model(input_ids=ids, attention_mask=mask).logits
    assert_close(disabled[real], ref_disabled[real], atol=2e-5, rtol=1e-5, name="disabled logits")
    assert (enabled - disabled)[real].abs().max() > 1e-3, "LoRA has no effect: the test would prove nothing"

    # A "ref" adapter (as TRL's DPOTrainer adds), with other weights, made active.
    targets = PHI3_LORA_TARGETS if model.config.model_type == "phi3" else LORA_TARGETS
    for m in (baseline, model):
        m.add_adapter("ref", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(baseline.named_parameters(), model.named_parameters()):
            if ".ref." in n1:
                p1.copy_(torch.randn_like(p1) * 0.1)
                p2.copy_(p1)
        baseline.set_adapter("ref"), model.set_adapter("ref")
        ref_ref = baseline(input_ids=ids, attention_mask=mask).logits
        with_ref = model(input_ids=ids, attention_mask=mask).logits
    assert_close(with_ref[real], ref_ref[real], atol=2e-5, rtol=1e-5, name="ref-adapter logits")
    assert (with_ref - enabled)[real].abs().max() > 1e-3


def test_gradient_accumulation_matches_one_big_batch(arch_path):
    """2 micro-batches of 2 with num_items_in_batch = all labels give the LoRA gradient of 1 batch of 4,
    with uneven label counts per micro-batch."""
    _, path = arch_path
    _, model = load_pair(path)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 211, (4, 11), generator=gen)
    labels = ids.clone()
    labels[0, :9] = -100  # micro-batch 1 has few labels, micro-batch 2 many
    labels[1, :7] = -100
    n_items = int((labels[:, 1:] != -100).sum())

    _, big = train_step(model, ids, None, labels)
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 2), slice(2, 4)):
        out = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=torch.tensor(n_items))
        out.loss.backward()
    assert_grads_match(lora_grads(model), big)


@pytest.mark.parametrize("mode, lora_dropout", [(True, 0.0), ("offload", 0.0), (True, 0.1)])
def test_gradient_checkpointing_gives_same_grads(tmp_path, mode, lora_dropout):
    """With LoRA dropout the recomputed forward must draw the masks the original forward drew."""
    path = save_tiny_model("llama", tmp_path / "m")
    _, plain = load_pair(path, gradient_checkpointing=False, lora_dropout=lora_dropout)
    _, ckpt = load_pair(path, gradient_checkpointing=mode, lora_dropout=lora_dropout)
    assert all(layer.gradient_checkpointing for layer in ckpt.get_base_model().model.layers)
    ids, mask, labels = padded_batch()
    torch.manual_seed(0)
    loss_plain, grads_plain = train_step(plain, ids, mask, labels)
    torch.manual_seed(0)
    loss_ckpt, grads_ckpt = train_step(ckpt, ids, mask, labels)
    assert_close(loss_ckpt, loss_plain, atol=1e-7, rtol=1e-7, name="loss")
    assert_grads_match(grads_ckpt, grads_plain)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_lora_dropout_matches_hf_with_the_same_masks(tmp_path, arch):
    """lora_dropout=0.1 on every projection, in training mode: fastft's fused path draws its masks inside its
    kernels; Hugging Face + peft, given those masks in place of its nn.Dropout modules, computes the same loss
    and LoRA gradients. Shows the whole chain (peft's dropout read in training mode, one mask per projection,
    q/k/v and gate/up on x, down on h) on the Triton kernels."""
    path = save_tiny_model(arch, tmp_path / "m")
    baseline, model = load_pair(path, lora_dropout=0.1)
    ids, mask, labels = padded_batch()
    torch.manual_seed(7)
    loss, grads = train_step(model, ids, mask, labels)

    config = model.config
    tokens = ids.numel()
    shapes = {"q_proj": config.hidden_size, "k_proj": config.hidden_size, "v_proj": config.hidden_size,
              "o_proj": config.num_attention_heads * config.head_dim, "gate_proj": config.hidden_size,
              "up_proj": config.hidden_size, "down_proj": config.intermediate_size}
    if arch == "phi3":  # one mask over x for the fused qkv_proj, one over x for the fused gate_up_proj
        shapes = {"qkv_proj": shapes["q_proj"], "o_proj": shapes["o_proj"], "gate_up_proj": shapes["gate_proj"],
                  "down_proj": shapes["down_proj"]}
    assert set(shapes) == set(PHI3_LORA_TARGETS if arch == "phi3" else LORA_TARGETS)
    draws = [(0.1, (tokens, shapes[name])) for _ in range(config.num_hidden_layers) for name in shapes]
    masks = iter(drawn_dropout_masks(7, draws))
    for layer in baseline.get_base_model().model.layers:  # in the order fastft draws: attention, then MLP
        for name in shapes:
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            module.lora_dropout["default"] = FixedDropoutMask(next(masks))
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)
    # the masks matter: without them (eval-mode dropout, none applied) the loss moves well beyond the tolerance
    model.eval()
    with torch.no_grad():
        undropped = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert (undropped - loss).abs() > 1e-4


def test_qwen2_sliding_window_matches_hf(tmp_path):
    """Qwen2 with use_sliding_window: layer 1 attends to the last 5 positions only (layer 0 in full)."""
    path = save_tiny_model("qwen2_sliding", tmp_path / "m")
    baseline, model = load_pair(path)
    assert [layer.self_attn.sliding_window for layer in model.get_base_model().model.layers] == [None, 5]
    ids, mask, labels = padded_batch()
    ref_loss, ref_grads = train_step(baseline, ids, mask, labels)
    loss, grads = train_step(model, ids, mask, labels)
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert_grads_match(grads, ref_grads)

"""``FASTFT_DISABLE_KERNELS`` / ``disable_kernels``: each kernel name moves its op off fastft's kernel.

Kernel level: a disabled op launches no Triton kernel and returns exactly what its PyTorch engine returns
(``use_engine("torch")``; each op's test file checks that engine against float64). Model level: a model loaded with
a name disabled never calls that fastft op and matches the unpatched transformers + peft model (logits, losses,
LoRA gradients, TRL's fused-head loss); with "all" it is that model, bit for bit.

"Not called" is watched by spies: a forbidden fastft function, or a Triton launch of a kernel defined in a
forbidden ``fastft.kernels`` module, raises ``KernelCalled``. Every spy is first seen to fire with the switch off.
"""
from __future__ import annotations

import contextlib
import importlib
import logging

import pytest
import torch
import triton.runtime.interpreter as interpreter
from kernel_testing import assert_close
from test_model_parity import assert_grads_match
from tiny_models import copy_lora, load_baseline, lora_grads, padded_batch, randomize_lora, save_tiny_model
from trl.trainer.utils import add_fused_lm_head

import fastft.kernels as K
import fastft.patch
from fastft import FastModel
from fastft.kernels import KERNEL_GROUPS, KERNEL_NAMES
from fastft.kernels._common import DISABLE_ENV, _parse_env, disabled_kernels, kernel_names, use_engine
from fastft.kernels.moe_experts import ExpertLora, NF4Experts

SWITCHES = [*KERNEL_NAMES, *KERNEL_GROUPS]  # every name, then the groups "lora" and "all"
# The model-level tests use a dense model: it has no experts for "moe_experts" to route (the kernel level covers it)
MODEL_SWITCHES = [switch for switch in SWITCHES if switch != "moe_experts"]


class KernelCalled(AssertionError):
    pass


@contextlib.contextmanager
def spies(functions=(), modules=()):
    """Inside the block, calling one of ``functions`` (dotted names of fastft functions, replaced where they are
    looked up) or launching a Triton kernel defined in one of the ``fastft.kernels`` ``modules`` ("*": any)
    raises KernelCalled. Yields the list of the modules whose kernels were launched."""
    launched = []
    original_run = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        module = self.fn.__module__.rsplit(".", 1)[-1]
        launched.append(module)
        if "*" in modules or module in modules:
            raise KernelCalled(f"Triton kernel {self.fn.__module__}.{self.fn.__name__} launched")
        return original_run(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for target in functions:
            owner, name = target.rsplit(".", 1)

            def forbidden(*args, _target=target, **kwargs):
                raise KernelCalled(f"{_target} called")

            patch.setattr(importlib.import_module(owner), name, forbidden)
        patch.setattr(interpreter.InterpretedFunction, "run", run)
        yield launched


# ---------------------------------------------------------------------------------------------
# Kernel level: one small call (forward and backward) of each op


def _leaf(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_()


def _nf4(gen, out_features, in_features):
    n = out_features * in_features
    return K.NF4Weight(packed=torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen),
                       absmax=torch.rand(-(-n // 64), generator=gen) + 0.5, code=torch.linspace(-1, 1, 16),
                       blocksize=64, shape=(out_features, in_features), dtype=torch.float32)


def _projection(gen, out_features, in_features, leaves, r=4):
    A, B = _leaf(gen, r, in_features, scale=0.3), _leaf(gen, out_features, r, scale=0.3)
    leaves += [A, B]
    return _nf4(gen, out_features, in_features), None, A, B, 2.0, None, 0.25  # LoRA dropout on: its kernels run too


def _lora_case(op):
    def case(gen):
        x = _leaf(gen, 5, 64)
        leaves = [x]
        if op == "lora_linear":
            return [K.lora_linear(x, *_projection(gen, 40, 64, leaves))], leaves
        if op == "lora_qkv":
            return list(K.lora_qkv(x, *(_projection(gen, n, 64, leaves) for n in (64, 32, 32)))), leaves
        gate, up = _projection(gen, 48, 64, leaves), _projection(gen, 48, 64, leaves)
        gate_up = _projection(gen, 96, 64, leaves)  # Phi-3's fused MLP, the same switch's
        return [K.lora_mlp(x, gate, up, _projection(gen, 64, 48, leaves)),
                K.lora_mlp_gate_up(x, gate_up, _projection(gen, 64, 48, leaves))], leaves
    return case


def _rms_norm(gen):
    x, w = _leaf(gen, 5, 37), _leaf(gen, 37)
    return [K.rms_norm(x, w)], [x, w]


def _rope(gen):
    q, k = _leaf(gen, 2, 4, 7, 16), _leaf(gen, 2, 2, 7, 16)
    cos, sin = torch.randn(1, 7, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    return list(K.apply_rope(q, k, cos, sin)), [q, k]


def _swiglu(gen):
    gate, up = _leaf(gen, 5, 23), _leaf(gen, 5, 23)
    return [K.swiglu(gate, up)], [gate, up]


def _labels(gen, n, vocab):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[1] = -100
    return labels


def _cross_entropy(gen):
    logits = _leaf(gen, 6, 50)
    return [K.cross_entropy(logits, _labels(gen, 6, 50))], [logits]


def _fused_linear_cross_entropy(gen):
    hidden, weight = _leaf(gen, 6, 16), _leaf(gen, 50, 16)
    return [K.fused_linear_cross_entropy(hidden, weight, _labels(gen, 6, 50))], [hidden, weight]


def _linear_log_probs(gen):
    hidden, weight = _leaf(gen, 6, 16), _leaf(gen, 50, 16)
    outputs = K.linear_log_probs(hidden, weight, _labels(gen, 6, 50), outputs=("log_probs", "entropy"))
    return [o for o in outputs if o is not None], [hidden, weight]


def _dequantize_nf4(gen):
    return [K.dequantize_nf4(_nf4(gen, 24, 40))], []


def _moe_experts(gen):
    """4 NF4 experts (blocks of 64, no double quantization), top-2 of 5 tokens, LoRA on both projections."""
    E, H, inter, r = 4, 64, 32, 4
    x, weights = _leaf(gen, 5, H), torch.rand(5, 2, generator=gen).requires_grad_()
    index = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(5)])
    experts = [NF4Experts(packed=torch.randint(0, 256, (E, out_f * in_f // 2), dtype=torch.uint8, generator=gen),
                            absmax=torch.rand(E, out_f * in_f // 64, generator=gen) + 0.5,
                            code=torch.linspace(-1, 1, 16) / 8, blocksize=64, shape=(out_f, in_f), dtype=torch.float32)
               for out_f, in_f in ((2 * inter, H), (H, inter))]
    loras = [(_leaf(gen, E, r, H, scale=0.3), _leaf(gen, E, 2 * inter, r, scale=0.3)),
             (_leaf(gen, E, r, inter, scale=0.3), _leaf(gen, E, H, r, scale=0.3))]
    out = K.moe_experts(x, index, weights, *experts, *(ExpertLora(A, B, 2.0) for A, B in loras))
    return [out], [x, weights, *(t for pair in loras for t in pair)]


def _attention(gen):
    q, k, v = _leaf(gen, 1, 4, 9, 16), _leaf(gen, 1, 2, 9, 16), _leaf(gen, 1, 2, 9, 16)
    qp, kp, vp = _leaf(gen, 9, 4, 16), _leaf(gen, 9, 2, 16), _leaf(gen, 9, 2, 16)  # two packed sequences: 4 + 5
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    return [K.attention(q, k, v), K.attention_varlen(qp, kp, vp, cu_seqlens, 5)], [q, k, v, qp, kp, vp]


KERNEL_CASES = {
    "rms_norm": _rms_norm, "rope": _rope, "swiglu": _swiglu, "cross_entropy": _cross_entropy,
    "fused_linear_cross_entropy": _fused_linear_cross_entropy, "linear_log_probs": _linear_log_probs,
    "nf4": _dequantize_nf4, "lora_linear": _lora_case("lora_linear"), "lora_qkv": _lora_case("lora_qkv"),
    "lora_mlp": _lora_case("lora_mlp"), "moe_experts": _moe_experts, "attention": _attention,
}
assert set(KERNEL_CASES) == set(KERNEL_NAMES)


def run_case(op: str, backward: bool = True) -> list[torch.Tensor]:
    """Op ``op`` on fixed inputs (the dropout seeds too): its outputs, then the gradients of its inputs."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    outputs, leaves = KERNEL_CASES[op](gen)
    if not backward:
        return outputs
    weights = [torch.randn(o.shape, generator=gen) for o in outputs]
    if leaves:
        torch.autograd.backward(outputs, weights)
    for leaf in leaves:
        assert leaf.grad is not None
    return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]


def assert_equal(got: list[torch.Tensor], expected: list[torch.Tensor], what: str):
    assert len(got) == len(expected) > 0
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{what}: result {i} differs from the reference (max abs diff {(a - b).abs().max()})"


@pytest.mark.parametrize("how", ["env", "context"])
@pytest.mark.parametrize("switch", SWITCHES)
def test_kernel_level_switch_runs_the_pytorch_engine(switch, how, monkeypatch):
    for op in kernel_names([switch], "test"):
        with spies(modules={"*"}), pytest.raises(KernelCalled):  # the spy fires while the op is on
            run_case(op)
        with use_engine("torch"):
            expected = run_case(op)
        if how == "env":  # set after import, as a notebook user would
            monkeypatch.setenv(DISABLE_ENV, switch)
            context = contextlib.nullcontext()
        else:
            context = K.disabled(switch)
        with spies(modules={"*"}), context:
            got = run_case(op)
        monkeypatch.delenv(DISABLE_ENV, raising=False)
        assert_equal(got, expected, f"{op} with {switch!r} disabled ({how})")


@pytest.mark.parametrize("op", ["lora_linear", "lora_qkv", "lora_mlp"])
def test_nf4_and_swiglu_switches_reach_inside_the_fused_lora_ops(op, monkeypatch):
    """With "nf4" (or "swiglu") disabled, a fused LoRA op still runs its other kernels, but dequantizes (or applies
    SwiGLU) on the PyTorch engine; the results are the ones with everything on (the engines agree bit for bit
    on dequantization, and to an ulp or so on SwiGLU). Another LoRA op disabled changes nothing here."""
    with spies() as launched:
        expected = run_case(op)
    assert "nf4" in launched and "lora_dropout" in launched and ("swiglu" in launched) == (op == "lora_mlp")
    other_lora_op = "lora_qkv" if op == "lora_linear" else "lora_linear"
    for name in ("nf4", "swiglu", other_lora_op):
        monkeypatch.setenv(DISABLE_ENV, name)
        with spies(modules={name}) as launched:
            got = run_case(op)
        assert "lora_dropout" in launched, f"{op}'s other kernels should still run with {name} disabled"
        for a, b in zip(got, expected):  # 1e-5: SwiGLU's ulps through two matmuls; a wrong route is off by >1e-2
            assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"{op} with {name} disabled")


@pytest.mark.parametrize("op", ["lora_linear", "lora_qkv", "lora_mlp", "moe_experts"])
def test_backward_runs_the_engines_of_its_forward(op):
    """A fused LoRA op disabled for its forward only still runs its backward (which dequantizes again and redraws
    the dropout mask) on the PyTorch engine: the mask must be the forward's."""
    with use_engine("torch"):
        expected = run_case(op)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with K.disabled(op):
        outputs, leaves = KERNEL_CASES[op](gen)
    weights = [torch.randn(o.shape, generator=gen) for o in outputs]
    with spies(modules={"*"}):
        torch.autograd.backward(outputs, weights)
    assert_equal([o.detach() for o in outputs] + [leaf.grad for leaf in leaves], expected, op)


def test_names_parse_leniently_and_unknown_names_fail_clearly(monkeypatch):
    assert kernel_names(" RMS_Norm , LoRA,, ", "env") == {"rms_norm", "lora_linear", "lora_qkv", "lora_mlp",
                                                           "moe_experts"}
    assert kernel_names("", "env") == kernel_names(None, "arg") == kernel_names([], "arg") == frozenset()
    assert kernel_names(["all"], "arg") == set(KERNEL_NAMES)
    valid = r"valid names: rms_norm, rope, swiglu, .*attention, or the groups lora, all"
    with pytest.raises(ValueError, match=rf"disable_kernels: unknown kernel name 'flash'; {valid}"):
        kernel_names(["rope", "flash"], "disable_kernels")
    with pytest.raises(TypeError, match="kernel names are strings, got 3"):
        kernel_names(["rope", 3], "disable_kernels")
    with pytest.raises(ValueError, match=rf"fastft.kernels.disabled: unknown kernel name 'rmsnorm'; {valid}"):
        with K.disabled("rmsnorm"):
            pass
    monkeypatch.setenv(DISABLE_ENV, "rope,flash_attn")
    with pytest.raises(ValueError, match=rf"FASTFT_DISABLE_KERNELS='rope,flash_attn': unknown kernel name "
                                         rf"'flash_attn'; {valid}"):
        run_case("rms_norm")


def test_the_environment_variable_is_read_at_every_call_and_parsed_once(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "rms_norm")
    with spies(modules={"*"}):
        run_case("rms_norm", backward=False)
    misses = _parse_env.cache_info().misses
    with spies(modules={"*"}):
        run_case("rms_norm", backward=False)
    assert _parse_env.cache_info().misses == misses
    monkeypatch.setenv(DISABLE_ENV, "")
    with spies(modules={"*"}), pytest.raises(KernelCalled):
        run_case("rms_norm", backward=False)


# ---------------------------------------------------------------------------------------------
# Model level: a tiny 4-bit Qwen3 (GQA, q/k norms, tied embeddings), as an SFT / DPO step sees it


# What a patched model must not touch when the name is disabled: fastft functions (where the patched forwards look
# them up) and the fastft.kernels modules whose Triton kernels must not launch.
MODEL_SPIES = {
    "rms_norm": (["fastft.patch.rms_norm"], {"rms_norm"}),
    "rope": (["fastft.patch.apply_rope"], {"rope"}),
    "swiglu": (["fastft.patch.swiglu"], {"swiglu"}),
    "cross_entropy": (["fastft.loss.cross_entropy"], set()),
    "fused_linear_cross_entropy": (["fastft.loss.fused_linear_cross_entropy"], set()),
    "linear_log_probs": (["fastft.trl_compat.linear_log_probs"], set()),
    "nf4": ([], {"nf4"}),
    "lora_linear": (["fastft.patch.lora_linear"], set()),
    "lora_qkv": (["fastft.patch.lora_qkv"], set()),
    "lora_mlp": (["fastft.patch.lora_mlp"], set()),
    "moe_experts": ([], {"moe_grouped_gemm"}),  # the expert op itself stays: its PyTorch engine serves 4-bit experts
    "attention": (["fastft.attention.attention", "fastft.attention.attention_varlen"], {"attention"}),
}
assert set(MODEL_SPIES) == set(KERNEL_NAMES)


def model_spies(switch: str):
    functions, modules = [], set()
    for name in kernel_names([switch], "test"):
        functions += MODEL_SPIES[name][0]
        modules |= MODEL_SPIES[name][1]
    return spies(functions, {"*"} if switch == "all" else modules)


def interpret_only_what_is_watched(switch: str):
    """The Triton interpreter takes seconds a model step: every kernel but those whose launches the spies of
    ``switch`` must see runs its PyTorch engine (the function spies see an op called whatever its engine).
    "nf4" and "swiglu" are watched inside the fused LoRA ops, which then stay on too."""
    watched = {"nf4": {"nf4", "lora_linear", "lora_qkv", "lora_mlp"}, "swiglu": {"swiglu", "lora_mlp"}}
    return K.disabled(*(set(KERNEL_NAMES) - watched.get(switch, set())))


def model_step(model, switch: str = "all") -> dict[str, torch.Tensor]:
    """What training and evaluation read off a model: eval logits and loss; the training loss of the model's own
    forward and its LoRA gradients; for the switches that reach it, TRL's fused-head loss (SFT/DPO) and its LoRA
    gradients."""
    ids, mask, labels = padded_batch()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    results = {"logits": out.logits[mask.bool()], "eval loss": out.loss}
    model.train()
    steps = [("", {})]
    if "linear_log_probs" in kernel_names([switch], "test"):
        steps.append(("TRL ", {"fused_lm_head": True}))
    for kind, kwargs in steps:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        loss.backward()
        results[f"{kind}loss"] = loss.detach()
        results.update({f"{kind}grad {name}": grad for name, grad in lora_grads(model).items()})
    return results


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def reference(qwen3_path):
    """The unpatched transformers + peft model (SDPA, as "attention" routes to) and its step's results."""
    model = load_baseline(qwen3_path, attn_implementation="sdpa", fused_lm_head=True)
    randomize_lora(model)
    return model, model_step(model)


def load_fastft(path, reference_model, gradient_checkpointing=False, **kwargs):
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32, **kwargs)
    add_fused_lm_head(model)  # as TRL's trainers do
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=gradient_checkpointing)
    copy_lora(reference_model, model)
    return model


@pytest.fixture(scope="module")
def fastft_model(qwen3_path, reference):
    return load_fastft(qwen3_path, reference[0])


def assert_matches_reference(results, expected, exact: bool):
    expected = {name: expected[name] for name in results}
    if exact:
        assert_equal(list(results.values()), list(expected.values()), "plain transformers + peft")
        return
    assert_close(results["logits"], expected["logits"], atol=2e-5, rtol=1e-5, name="logits")  # tolerances of
    for loss in [name for name in results if name.endswith("loss")]:                          # test_model_parity
        assert_close(results[loss], expected[loss], atol=1e-6, rtol=1e-6, name=loss)
    grads = {name: value for name, value in results.items() if "grad" in name}
    assert_grads_match(grads, {name: expected[name] for name in grads})


@pytest.mark.parametrize("switch", MODEL_SWITCHES)
def test_the_spies_fire_on_a_model_with_every_kernel(switch, fastft_model):
    with interpret_only_what_is_watched(switch), model_spies(switch), pytest.raises(KernelCalled):
        model_step(fastft_model, switch)


@pytest.mark.parametrize("switch", MODEL_SWITCHES)
def test_model_level_switch_routes_to_transformers_and_peft(switch, qwen3_path, reference, caplog):
    # the fused LoRA ops' kernels must honour "nf4" / "swiglu" in a checkpointed recompute too
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model = load_fastft(qwen3_path, reference[0], gradient_checkpointing=switch in ("nf4", "swiglu"),
                            disable_kernels=[switch])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fastft: kernels disabled")]
    assert lines == [lines[0]] and f"(disable_kernels=['{switch}'])" in lines[0]
    with interpret_only_what_is_watched(switch), model_spies(switch):
        results = model_step(model, switch)
    assert disabled_kernels() == frozenset(), "a model's disabled names leaked out of its forward"
    assert_matches_reference(results, reference[1], exact=switch == "all")


def test_log_line_names_each_route_and_the_kernels_kept(qwen3_path, reference, caplog):
    with caplog.at_level(logging.WARNING, logger="fastft"):
        load_fastft(qwen3_path, reference[0])
        assert not [r for r in caplog.records if "kernels disabled" in r.getMessage()]
        load_fastft(qwen3_path, reference[0], disable_kernels=["attention", "lora_mlp", "fused_linear_cross_entropy"])
    (line,) = [r.getMessage() for r in caplog.records if "kernels disabled" in r.getMessage()]
    assert line == ("fastft: kernels disabled (disable_kernels=['attention', 'lora_mlp', "
                    "'fused_linear_cross_entropy']): "
                    "fused_linear_cross_entropy -> full logits + fastft's cross_entropy kernel, "
                    "lora_mlp -> peft's forward, attention -> PyTorch SDPA; fastft kernels: rms_norm, rope, swiglu, "
                    "cross_entropy, linear_log_probs, nf4, lora_linear, lora_qkv, moe_experts")


def test_environment_and_argument_unite(qwen3_path, reference, caplog, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, " Rope,nf4 ")
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model = load_fastft(qwen3_path, reference[0], disable_kernels="lora_mlp")
    monkeypatch.delenv(DISABLE_ENV)  # the model keeps its routes; the kernel level no longer adds any
    (line,) = [r.getMessage() for r in caplog.records if "kernels disabled" in r.getMessage()]
    assert line.startswith("fastft: kernels disabled (FASTFT_DISABLE_KERNELS=Rope,nf4; disable_kernels='lora_mlp'): "
                           "rope -> transformers' apply_rotary_pos_emb, nf4 -> PyTorch dequantization")
    assert "lora_mlp -> peft's forward" in line
    with interpret_only_what_is_watched("nf4"), spies(MODEL_SPIES["rope"][0] + MODEL_SPIES["lora_mlp"][0], {"nf4"}):
        results = model_step(model, "nf4")
    assert_matches_reference(results, reference[1], exact=False)


@pytest.fixture(scope="module")
def phi3_reference(tmp_path_factory):
    path = save_tiny_model("phi3", tmp_path_factory.mktemp("phi3"))
    model = load_baseline(path, attn_implementation="sdpa", fused_lm_head=True)
    randomize_lora(model)
    return path, model, model_step(model, "lora")


@pytest.mark.parametrize("switch", ["lora_qkv", "lora_mlp"])
def test_phi3_fused_projections_follow_the_switch(switch, phi3_reference, monkeypatch):
    """Phi-3's qkv_proj (one lora_linear) runs peft's forward under "lora_qkv", its gate_up MLP (lora_mlp_gate_up)
    under "lora_mlp", with fastft's SwiGLU on peft's two halves; the model still matches transformers + peft."""
    path, baseline, expected = phi3_reference
    model = load_fastft(path, baseline, disable_kernels=[switch])
    calls = dict.fromkeys(["lora_linear", "lora_mlp_gate_up", "swiglu"], 0)
    for name in calls:
        def counted(*args, _real=getattr(fastft.patch, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(fastft.patch, name, counted)
    with interpret_only_what_is_watched(switch):
        results = model_step(model, switch)
    forwards = 2 * model.config.num_hidden_layers  # model_step: an eval forward and a training one, per layer
    mlp_routed = switch == "lora_mlp"
    assert calls == {"lora_linear": forwards * (2 if mlp_routed else 1), "lora_mlp_gate_up": 0 if mlp_routed else
                     forwards, "swiglu": forwards if mlp_routed else 0}
    assert_matches_reference(results, expected, exact=False)


def test_unknown_names_fail_before_loading(qwen3_path, monkeypatch):
    with pytest.raises(ValueError, match="disable_kernels: unknown kernel name 'flash'; valid names: rms_norm, "):
        FastModel.from_pretrained(qwen3_path, disable_kernels=["flash"])
    monkeypatch.setenv(DISABLE_ENV, "lora,xformers")
    with pytest.raises(ValueError, match="FASTFT_DISABLE_KERNELS='lora,xformers': unknown kernel name 'xformers'"):
        FastModel.from_pretrained(qwen3_path)


def test_a_models_switches_stay_with_it(qwen3_path, reference, fastft_model):
    """A plain model and one with every kernel disabled, side by side: each keeps its own routes."""
    model = load_fastft(qwen3_path, reference[0], disable_kernels="all")
    assert model.config._attn_implementation == "sdpa" and fastft_model.config._attn_implementation == "fastft"
    with model_spies("all"):
        model_step(model, "lora")
    with interpret_only_what_is_watched("lora"), model_spies("lora"), pytest.raises(KernelCalled):
        model_step(fastft_model, "lora")

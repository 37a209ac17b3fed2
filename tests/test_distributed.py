"""fastft past one GPU, tested on CPU.

* Device choice of ``FastModel.from_pretrained`` on a multi-GPU machine (CUDA queries mocked): each rank of a
  torchrun / accelerate launch job loads onto ``cuda:LOCAL_RANK``; an explicit ``device_map`` wins; GPUs that do
  not exist are errors.
* FSDP's view of a 4-bit layer (the all-gathered packed bytes as a plain parameter, the quant state on the module):
  the fused path reads it exactly, and refuses what it cannot read.
* Training: 2 ranks (gloo) under torchrun through TRL's SFTTrainer / DPOTrainer and accelerate, DDP and FSDP2,
  against one process with the same global batch (``tests/distributed_worker.py``, whose doc lists the test-only
  settings: fp32 LoRA weights, SGD, and the one shim that lets accelerate choose FSDP on CPU). These runs use
  fastft's PyTorch engine (no TRITON_INTERPRET), as test_examples.py does: under test is the distribution, not the
  kernels.

Tolerances of the training comparisons, measured: losses agree to ~1e-7 relative and the final LoRA weights differ
by ~3e-7 of their change over training (a different summation order of the same fp32 gradients). A rank training
on the wrong data, a gradient not averaged, a wrong loss scale or a LoRA weight read wrong moves either by >1e-2.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import transformers
from kernel_testing import env_without_interpreter
from tiny_models import save_tiny_model
from torch import nn

from fastft import placement
from fastft.kernels.nf4 import dequantize_nf4
from fastft.quant import UnsupportedWeight, dequantize_4bit, fused_linear_args

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_RTOL = 1e-5
LORA_RTOL = 1e-4  # of the weights' change over training


# ---------------------------------------------------------------------------------------------------------------
# Device choice, on a mocked machine with 4 GPUs


@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda answers as on a machine with 4 GPUs, current device 0 (what every rank sees before the trainer
    sets its device); ``set_device`` calls are recorded."""
    set_devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_devices.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_devices


class Loaded(Exception):
    """Raised by the stubbed transformers loader, carrying what FastModel asked it for."""


@pytest.fixture
def captured_load(monkeypatch, tmp_path):
    """FastModel.from_pretrained up to transformers' loading: returns a function giving its keyword arguments."""
    path = save_tiny_model("llama", tmp_path / "m")

    def load(*args, **kwargs):
        raise Loaded(kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)

    def call(**kwargs):
        # Imported here, not when pytest collects this file: transformers replaces its module in sys.modules on
        # first use, and fastft.model imported before that would not see test_fast_model's patch of the new one.
        from fastft import FastModel

        with pytest.raises(Loaded) as loaded:
            FastModel.from_pretrained(path, **kwargs)
        return loaded.value.args[0]

    return call


def test_each_rank_loads_onto_its_own_gpu(four_gpus, captured_load, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    kwargs = captured_load()
    assert kwargs["device_map"] == {"": torch.device("cuda", 3)}
    assert four_gpus == [torch.device("cuda", 3)]  # fastft's Triton kernels launch on the current device
    # 4-bit codes stored in the compute dtype, so FSDP can shard them
    assert kwargs["quantization_config"].bnb_4bit_quant_storage == kwargs["dtype"] == torch.bfloat16


def test_without_local_rank_the_current_gpu(four_gpus, captured_load):
    assert captured_load()["device_map"] == {"": torch.device("cuda", 0)}


@pytest.mark.parametrize("device_map, gpu", [({"": 1}, 1), ("cuda:2", 2), (torch.device("cuda", 1), 1),
                                             ("cpu", None), ({"model": "cpu", "lm_head": 2}, 2)])
def test_an_explicit_device_map_wins(four_gpus, captured_load, monkeypatch, device_map, gpu):
    monkeypatch.setenv("LOCAL_RANK", "3")
    kwargs = captured_load(device_map=device_map)
    assert kwargs["device_map"] == device_map
    assert four_gpus == ([torch.device("cuda", gpu)] if gpu is not None else [])
    assert kwargs["dtype"] == (torch.bfloat16 if gpu is not None else torch.float32)


@pytest.mark.parametrize("device_map", ["cuda:4", 7, {"": 4}, {"model": 0, "lm_head": "cuda:9"},
                                        torch.device("cuda", 4)])
def test_a_device_map_naming_a_missing_gpu_is_an_error(four_gpus, captured_load, device_map):
    with pytest.raises(ValueError, match=r"device_map=.* asks for GPU \d, but 4 CUDA GPU\(s\) are visible"):
        captured_load(device_map=device_map)
    assert four_gpus == []


def test_a_gpu_device_map_without_gpus_is_an_error(captured_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"asks for GPU 0, but 0 CUDA GPU\(s\) are visible"):
        captured_load(device_map="cuda:0")


def test_a_device_map_that_is_no_device_is_an_error(four_gpus, captured_load):
    with pytest.raises(ValueError, match="device_map names 'gpu0', which is not a device"):
        captured_load(device_map={"": "gpu0"})


def test_local_rank_beyond_the_gpu_count_is_an_error(four_gpus, captured_load, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=4 .* asks for GPU 4, but 4 CUDA GPU\(s\) are visible "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\); launch at most that many processes"):
        captured_load()
    assert four_gpus == []


def test_a_spreading_device_map_under_torchrun_warns(four_gpus, captured_load, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="device_map='auto' spreads each rank's model over all GPUs"):
        captured_load(device_map="auto")


def test_local_rank_on_a_machine_without_gpus_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert placement.default_device() == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# A 4-bit layer as FSDP leaves it during its unit's forward


@pytest.fixture
def linear4bit():
    """A quantized bitsandbytes Linear4bit whose 4-bit codes are stored as float32 (as FastModel stores them in
    the compute dtype), and its dequantized weight."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              quant_storage=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 192), requires_grad=False, quant_type="nf4",
                                     quant_storage=torch.float32, module=layer)
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.float32 and layer.weight.bnb_quantized
    return layer, dequantize_4bit(layer.weight)


def test_fsdp_gathered_4bit_weight_is_read_with_its_quant_state(linear4bit):
    """Inside an FSDP unit the layer's weight is a plain parameter holding the all-gathered bytes (FSDP2 swaps
    the Params4bit out); bitsandbytes keeps the quant state on the module."""
    layer, expected = linear4bit
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    weight = fused_linear_args(layer).weight
    assert torch.equal(dequantize_nf4(weight), expected)


def test_fsdp_cast_of_the_4bit_codes_is_an_error(linear4bit):
    """FSDP's mixed precision casts parameters to its param_dtype: packed codes cast as numbers are lost."""
    layer, _ = linear4bit
    layer.weight = nn.Parameter(layer.weight.data.to(torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match=r"stored as torch.float32 but arrives as torch.bfloat16: FSDP's mixed "
                                         r"precision cast the packed 4-bit codes.*bnb_4bit_quant_storage"):
        fused_linear_args(layer)


def test_fsdp_shard_outside_its_unit_falls_back(linear4bit):
    """Outside its unit's forward the weight is a DTensor shard: not a weight the fused path can read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    layer, _ = linear4bit
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard = DTensor.from_local(layer.weight.data.clone(), init_device_mesh("cpu", (1,)), [Shard(0)])
        layer.weight = nn.Parameter(shard, requires_grad=False)
        with pytest.raises(UnsupportedWeight, match="an FSDP shard"):
            fused_linear_args(layer)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("head_unit", ["own", "with_norm"])
def test_labels_loss_stays_fused_under_fsdp2(tmp_path, head_unit):
    """FSDP2 makes the head an FSDPLinear; the labels loss still takes the fused lm-head path (no logits) and equals
    the unsharded model's, whether the head is its own unit (resharded: a DTensor shard when the loss reads it) or
    grouped with the final norm without resharding, as accelerate's FSDP2 plugin groups it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from fastft import FastModel

    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32, load_in_4bit=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=ids).loss
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        if head_unit == "own":
            fully_shard(model.lm_head, mesh=mesh)
        else:
            fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
        assert isinstance(model.lm_head, FSDPModule)
        out = model(input_ids=ids, labels=ids)
        assert out.logits is None  # the fused path: transformers' forward would return [2, 11, vocab] logits
        torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Training on 2 ranks against one process


SFT = ["--trainer", "sft", "--grad-accum", "2", "--gradient-checkpointing"]
DPO = ["--trainer", "dpo", "--gradient-checkpointing"]
# name: (model, ranks, worker arguments); one process takes the global batch of 2 ranks x batch 1
RUNS = {
    "sft-one": ("llama", 1, SFT + ["--batch-size", "2"]),
    "sft-ddp": ("llama", 2, SFT + ["--save-steps", "3"]),
    "sft-fsdp": ("llama", 2, SFT + ["--fsdp"]),
    "dpo-one": ("qwen2", 1, DPO + ["--batch-size", "2"]),  # Qwen2: tied embeddings, q/k/v bias
    "dpo-ddp": ("qwen2", 2, DPO),
    "dpo-fsdp": ("qwen2", 2, DPO + ["--fsdp"]),
    "dropout-ddp": ("llama", 2, SFT + ["--lora-dropout", "0.1"]),
    "dropout-fsdp": ("llama", 2, SFT + ["--lora-dropout", "0.1", "--fsdp"]),
    "lora-bias-ddp": ("llama", 2, SFT + ["--lora-bias"]),
    "lora-bias-fsdp": ("llama", 2, SFT + ["--lora-bias", "--fsdp"]),
    "adamw-fsdp": ("llama", 2, SFT + ["--fsdp", "--adamw", "--save-steps", "3"]),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(name, *extra_args)``: (per-rank results, output directory, stderr) of RUNS[name], launched once per
    module; ``name+suffix`` runs RUNS[name] with extra arguments."""
    root = tmp_path_factory.mktemp("distributed")
    models = {}
    results = {}

    def launch(name, *extra):
        if name in results:
            return results[name]
        arch, ranks, args = RUNS.get(name) or RUNS[name.split("+")[0]]
        if arch not in models:
            models[arch] = save_tiny_model(arch, root / arch)
        out, res = root / name / "out", root / name / "results"
        env = env_without_interpreter(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd = (launcher if ranks > 1 else [sys.executable]) + [
            os.path.join(HERE, "distributed_worker.py"), "--model", models[arch], "--output-dir", str(out),
            "--result-dir", str(res), *args, *extra]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        results[name] = [torch.load(res / f"rank{r}.pt") for r in range(ranks)], out, done.stderr
        return results[name]

    return launch


def assert_same_training(got, ref):
    """``got`` (one rank's result) trained as ``ref`` did: same logged losses, same final LoRA weights."""
    assert len(got["losses"]) == len(ref["losses"]) > 0
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: {got['losses']} vs {ref['losses']}"
    assert got["lora"].keys() == ref["lora"].keys()
    change = sum(((ref["lora"][n] - ref["lora_init"][n]) ** 2).sum() for n in ref["lora"]) ** 0.5
    diff = sum(((got["lora"][n] - ref["lora"][n]) ** 2).sum() for n in ref["lora"]) ** 0.5
    assert change > 0.1, "training hardly moved the LoRA weights: the comparison proves little"
    assert diff <= LORA_RTOL * change, f"LoRA weights differ by {diff / change:.2e} of their change"


def assert_fused_path_ran(result):
    assert result["fallbacks"] == [], result["fallbacks"]
    assert all(result["calls"].get(op, 0) > 0 for op in ("lora_qkv", "lora_mlp", "lora_linear", "linear_log_probs"))


def assert_ranks_agree(ranks):
    """DDP and FSDP keep one model: every rank ends with the same LoRA weights and logs the same losses."""
    for other in ranks[1:]:
        assert other["losses"] == ranks[0]["losses"]
        assert all(torch.equal(other["lora"][n], w) for n, w in ranks[0]["lora"].items())


@pytest.mark.slow
def test_ddp_sft_matches_one_process(run):
    """Batch 1 on each of 2 ranks, gradient accumulation 2, non-reentrant gradient checkpointing."""
    (one,), *_ = run("sft-one")
    ranks, *_ = run("sft-ddp")
    assert [r["world_size"] for r in ranks] == [2, 2] and not ranks[0]["fsdp"]
    assert_ranks_agree(ranks)
    assert_same_training(ranks[0], one)
    assert_fused_path_ran(ranks[0])


@pytest.mark.slow
def test_ddp_only_rank0_writes_checkpoints_and_adapter(run):
    from safetensors.torch import load_file

    ranks, out, _ = run("sft-ddp")
    # the Trainer's one file per rank: its RNG state, for an exact resume
    assert sorted(ranks[1]["writes"]) == ["checkpoint-3/rng_state_1.pth", "checkpoint-6/rng_state_1.pth"]
    written = set(ranks[0]["writes"])
    for checkpoint in ("checkpoint-3", "checkpoint-6"):
        expected = ("adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth")
        assert {f"{checkpoint}/{name}" for name in expected} <= written
    assert "adapter_model.safetensors" in written
    # the saved adapter is the trained one
    saved = load_file(out / "adapter_model.safetensors")
    trained = {n.replace(".default.", "."): w for n, w in ranks[0]["lora"].items()}
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[n].float(), w) for n, w in trained.items())


@pytest.mark.slow
def test_ddp_resume_from_checkpoint_continues_the_same_run(run):
    full, out, _ = run("sft-ddp")
    resumed, *_ = run("sft-ddp+resume", "--resume-from", str(out / "checkpoint-3"))
    assert_ranks_agree(resumed)
    # the restored state (LoRA weights, optimizer, data order, RNG) continues the uninterrupted run exactly
    assert resumed[0]["losses"][-3:] == pytest.approx(full[0]["losses"][-3:], rel=LOSS_RTOL)
    assert all(torch.allclose(resumed[0]["lora"][n], w, rtol=0, atol=1e-6) for n, w in full[0]["lora"].items())


@pytest.mark.slow
def test_ddp_dpo_matches_one_process(run):
    """The reference log-probs come from TRL's `ref` adapter on each rank."""
    (one,), *_ = run("dpo-one")
    ranks, *_ = run("dpo-ddp")
    assert_ranks_agree(ranks)
    assert_same_training(ranks[0], one)
    assert ranks[0]["rewards"] == pytest.approx(one["rewards"], rel=1e-4, abs=1e-6)
    assert max(abs(r) for r in one["rewards"]) > 1e-2  # the reference differs from the policy
    assert_fused_path_ran(ranks[0])


@pytest.mark.slow
def test_fsdp_sft_matches_one_process(run):
    """FSDP2 (accelerate's plugin, fully_shard per decoder layer) shards the 4-bit weights; fastft's fused path reads
    each gathered weight with its quant state, and TRL's loss still goes through fastft's log-prob kernel."""
    (one,), *_ = run("sft-one")
    ranks, *_ = run("sft-fsdp")
    assert [r["fsdp"] for r in ranks] == [True, True]
    sharding = ranks[0]["sharding"]
    four_bit = [n for n in sharding if n.endswith("base_layer.weight")]
    assert len(four_bit) == 14 and all(2 * sharding[n][1] == sharding[n][0] for n in four_bit)
    assert all(local < full for full, local in sharding.values())  # LoRA, norms, embeddings: all sharded
    assert_ranks_agree(ranks)
    assert_same_training(ranks[0], one)
    assert_fused_path_ran(ranks[0])
    assert sorted(ranks[1]["writes"]) == []  # save_model gathers the adapter; rank 0 writes it


@pytest.mark.slow
def test_fsdp_dpo_matches_one_process(run):
    (one,), *_ = run("dpo-one")
    ranks, *_ = run("dpo-fsdp")
    assert [r["fsdp"] for r in ranks] == [True, True]
    assert_ranks_agree(ranks)
    assert_same_training(ranks[0], one)
    assert ranks[0]["rewards"] == pytest.approx(one["rewards"], rel=1e-4, abs=1e-6)
    assert_fused_path_ran(ranks[0])


@pytest.mark.slow
def test_fsdp_resume_from_checkpoint_continues_the_same_run(run):
    """AdamW: torch cannot restore the (empty) FSDP optimizer state of plain SGD."""
    full, out, _ = run("adamw-fsdp")
    resumed, *_ = run("adamw-fsdp+resume", "--resume-from", str(out / "checkpoint-3"))
    assert resumed[0]["fsdp"]
    assert_ranks_agree(resumed)
    assert resumed[0]["losses"][-3:] == pytest.approx(full[0]["losses"][-3:], rel=LOSS_RTOL)
    assert all(torch.allclose(resumed[0]["lora"][n], w, rtol=0, atol=1e-6) for n, w in full[0]["lora"].items())


@pytest.mark.slow
def test_fsdp_layers_the_fused_path_cannot_serve_run_peft_with_a_warning(run):
    """lora_bias=True: every projection runs peft's (bitsandbytes') forward on the gathered weight, says why,
    and trains as DDP does."""
    ddp, *_ = run("lora-bias-ddp")
    fsdp, _, log = run("lora-bias-fsdp")
    assert fsdp[0]["fsdp"]
    assert "fastft: adapter 'default' has lora_bias=True" in log and "this projection runs peft's own forward" in log
    assert fsdp[0]["calls"].get("lora_mlp", 0) == 0
    assert_ranks_agree(fsdp)
    assert_same_training(fsdp[0], ddp[0])


@pytest.mark.slow
def test_fsdp_with_lora_dropout_runs_the_fused_path(run):
    """lora_dropout > 0 is served by the fused kernels under FSDP too (each rank draws its masks from its own
    seeded generator, as under DDP), and trains as DDP does."""
    ddp, *_ = run("dropout-ddp")
    fsdp, _, log = run("dropout-fsdp")
    assert fsdp[0]["fsdp"]
    assert_fused_path_ran(fsdp[0])
    assert "peft's own forward" not in log and not fsdp[0]["fallbacks"]
    assert_ranks_agree(fsdp)
    assert_same_training(fsdp[0], ddp[0])

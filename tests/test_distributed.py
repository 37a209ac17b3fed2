"""fastft past one GPU, tested on CPU.

* Device choice of ``FastModel.from_pretrained`` on a multi-GPU machine (CUDA queries mocked): each rank of a
  torchrun / accelerate launch job loads onto ``cuda:LOCAL_RANK``; an explicit ``device_map`` wins; GPUs that do
  not exist are errors.
* FSDP's view of a 4-bit layer (the all-gathered packed bytes as a plain parameter, the quant state on the module):
  the fused path reads it exactly, and refuses what it cannot read.
"""
import os

import pytest
import torch
import torch.distributed as dist
import transformers
from torch import nn

from fastft import FastModel
from fastft import placement
from fastft.kernels.nf4 import dequantize_nf4
from fastft.quant import UnsupportedWeight, dequantize_4bit, fused_linear_args
from tiny_models import save_tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


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

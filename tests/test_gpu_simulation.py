"""The simulated GPU of the kernel library (``gpu_simulation``) is a scoped context: what the memory accounting and
the compile check simulate is restored when they finish, nested uses keep what they do not set, and an error
inside restores it too (it used to be module globals that each consumer overwrote)."""
import pytest
import torch

from fastft.kernels import _common
from fastft.kernels._common import compute_capability, gpu_simulation, multiprocessor_count, on_gpu
from fastft.memory.simulated_gpu import simulated_gpu

CPU, META = torch.device("cpu"), torch.device("meta")


def _seen():
    return (on_gpu(torch.empty(0)), on_gpu(torch.empty(0, device="meta")), multiprocessor_count(CPU),
            compute_capability(META))


def test_nested_simulations_keep_what_they_do_not_set_and_restore_on_exit():
    assert _seen() == (False, False, 132, 90)
    with gpu_simulation("meta", sm_count=10):
        assert _seen() == (False, True, 10, 90)
        with gpu_simulation("cpu", compute_capability=75):
            assert _seen() == (True, True, 10, 75)
        assert _seen() == (False, True, 10, 90)
    assert _seen() == (False, False, 132, 90)


def test_an_error_inside_restores_the_simulation():
    with pytest.raises(RuntimeError, match="inside"):
        with gpu_simulation("cpu", sm_count=7, compute_capability=70):
            raise RuntimeError("inside")
    assert _seen() == (False, False, 132, 90)


def test_the_memory_accountings_simulation_ends_with_it():
    with simulated_gpu(sm_count=20):
        assert _seen()[1:3] == (True, 20)
    assert _seen() == (False, False, 132, 90)
    assert not hasattr(_common, "GPU_DEVICE_TYPES")  # no process-wide switch left for a consumer to overwrite

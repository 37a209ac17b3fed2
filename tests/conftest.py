import os
import sys

# The kernels are tested in Triton's CPU interpreter; the flag must be set before triton is imported.
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run the tests with TRITON_INTERPRET=1 (triton was imported before conftest could set it)")
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

# Under pytest-xdist (-n N) the cores are shared between the N worker processes.
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest  # noqa: E402

from fastft.kernels._common import poison_outputs  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output buffer starts as NaN in tests, so an unwritten element fails."""
    with poison_outputs():
        yield

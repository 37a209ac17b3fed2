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


def pytest_addoption(parser):
    parser.addoption("--compat", action="store_true",
                     help="run only the compat subset (tests/compat_subset.py), each case on its engine, as CI does on "
                          "the oldest supported versions")


def _compat_case(nodeid: str) -> str | None:
    """The entry of tests/compat_subset.py that selects ``nodeid``: the id itself, its function, or its file."""
    from compat_subset import CASES

    for case in (nodeid, nodeid.split("[")[0], nodeid.split("::")[0]):
        if case in CASES:
            return case
    return None


def _compat_files() -> set[str]:
    from compat_subset import CASES

    return {case.split("::")[0] for case in CASES}


def pytest_ignore_collect(collection_path, config):
    """With --compat, the other test files are not even imported (collecting all of them takes a minute)."""
    if config.getoption("--compat") and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return f"tests/{collection_path.name}" not in _compat_files()
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--compat"):
        return
    from compat_subset import CASES

    selected = [item for item in items if _compat_case(item.nodeid)]
    # a case that no longer names a test (renamed, reparametrized) must not drop out of the subset silently
    collected_files = {item.nodeid.split("::")[0] for item in items}
    missing = {case for case in CASES if case.split("::")[0] in collected_files} - {
        _compat_case(item.nodeid) for item in selected}
    missing |= {case for case in CASES if not (config.rootpath / case.split("::")[0]).exists()}
    if missing:
        raise pytest.UsageError("tests/compat_subset.py names tests that do not exist: " + ", ".join(sorted(missing)))
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected


@pytest.fixture
def gpu_path_on_cpu():
    """Run fastft's GPU branches on CPU tensors (their Triton kernels interpreted)."""
    from fastft.kernels._common import gpu_simulation

    with gpu_simulation("cpu"):
        yield


@pytest.fixture(autouse=True)
def _compat_engine(request):
    from compat_subset import ON_TORCH_ENGINE

    if request.config.getoption("--compat") and _compat_case(request.node.nodeid) in ON_TORCH_ENGINE:
        from fastft.kernels import use_engine

        with use_engine("torch"):
            yield
    else:
        yield

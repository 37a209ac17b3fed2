"""The parts of ``bench/run.py``: the model and LoRA settings every contender shares (``config``), the
random-weight checkpoints (``checkpoint``), the training worker that runs one contender in its own process
(``worker``), and the ratios, Markdown and plot of the results (``report``).

``bench/run.py`` loads this folder by path as the package ``fastft_bench_training`` (``bench/`` itself is
not a package), and ``bench/_shared.py`` the same way, as ``shared``.
"""
from __future__ import annotations

import importlib.util
import os


def _load_shared():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_shared.py")
    spec = importlib.util.spec_from_file_location("fastft_bench_shared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = _load_shared()

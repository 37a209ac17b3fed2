"""The parts of ``bench/run.py``: the model and LoRA settings every contender shares (``config``), the
random-weight checkpoints (``checkpoint``), the training worker that runs one contender in its own process
(``worker``), and the ratios, Markdown and plot of the results (``report``).

``bench/run.py`` loads this folder by path as the package ``fastft_bench_training`` (``bench/`` itself is
not a package) after putting ``bench/`` on ``sys.path``, so ``bench/_shared.py`` imports as ``_shared``; the
modules here reach it as ``from . import shared``.
"""
from __future__ import annotations

import _shared as shared  # noqa: F401 - bench/ is on sys.path (see bench/run.py)

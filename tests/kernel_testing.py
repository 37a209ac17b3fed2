"""Helpers for kernel tests. (Output poisoning is on for every test: see conftest.py.)"""
from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but compares in float64, treats any NaN/inf in ``actual``
    as a failure (an unwritten, poisoned element shows up that way), and reports the worst
    elements by index."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_values = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_values.any():
        idx = bad_values.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_values.sum())} non-finite elements where finite expected, "
                             f"first at {idx}")
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    over = err > allowed
    if over.any():
        idx = over.nonzero()[:5].tolist()
        worst = int(torch.argmax(err - allowed))
        flat_a, flat_e = a.flatten(), e.flatten()
        raise AssertionError(
            f"{name}: {int(over.sum())}/{a.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max abs err {err.max().item():.3e}; first bad at {idx}; worst flat index {worst}: "
            f"got {flat_a[worst].item():.6e}, expected {flat_e[worst].item():.6e}"
        )


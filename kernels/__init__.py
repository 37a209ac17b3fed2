"""fastft's kernel library: Triton kernels with hand-written backward passes.

Imports only torch and triton. Installed as ``fastft.kernels`` (never as a top-level ``kernels``:
that name belongs to a Hugging Face package transformers probes for).
"""
from ._common import use_engine

__all__ = ["use_engine"]

"""Fused kernels for the adaptation hot path.

Each module holds one op: its PyTorch reference, its Triton kernel(s) and the autograd
``Function`` that wraps them.  Triton is imported lazily so that the references (and the
whole library on CPU) work where Triton is absent.
"""

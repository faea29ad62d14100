"""Triton kernels of minaction (installed as ``minaction.kernels``)."""

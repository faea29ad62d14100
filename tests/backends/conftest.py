"""Shared fixtures of the backend tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def aten_reference():
    """Make torch's references ATen's own formulas. For float gelu torch picks oneDNN's JIT kernel on some
    CPUs, and on AVX-512 machines that kernel returns NaN for gelu(+inf) (inf elsewhere, and in double):
    a reference that differs between machines would make these tests pass or fail by CPU."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() would also warn about TF32 on every test)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before

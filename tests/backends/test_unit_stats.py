"""minaction::unit_stats (activation statistics in one pass) against torch's reductions, and the
statistics it feeds (minaction.models.stats) unchanged with or without it."""
from __future__ import annotations

import pytest
import torch

import minaction
from minaction.backends import cpu as cpu_backend
from minaction.models import stats


def setup_module(module):
    ok, why = minaction.backends.select.available("cpu", "cpu")
    if not ok:
        pytest.fail(f"the cpu backend must build on this machine: {why}")
    cpu_backend.load()


def _ref(y, p, unit_dim):
    dims = tuple(d for d in range(1, y.dim()) if d != unit_dim)
    nz = ((y != 0) | y.isnan()).flatten(1).sum(1).double()
    return (y.double().abs() ** p).sum(dims), nz


SHAPES = [((2, 3, 4, 28, 28), 2), ((1, 7, 5, 3), 2), ((3, 40, 19), 2), ((2, 9, 11, 130), 3), ((4, 1, 1), 1),
          ((2, 600, 33), 2), ((1, 2, 17, 16), 2)]


@pytest.mark.parametrize("shape,unit_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_torch(shape, unit_dim, dtype, p):
    g = torch.Generator().manual_seed(sum(shape) + p)
    y = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    flat = y.view(-1)
    flat[0] = float("nan")
    flat[min(1, flat.numel() - 1)] = -0.0  # not a non-zero
    s, nz = torch.ops.minaction.unit_stats(y, p, unit_dim)
    rs, rnz = _ref(y, p, unit_dim)
    assert s.dtype == nz.dtype == torch.float64 and s.shape == (shape[0], shape[unit_dim]) and nz.shape == shape[:1]
    torch.testing.assert_close(s, rs, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0.0, equal_nan=True)
    assert torch.equal(nz, rnz)


def test_noncontiguous_and_empty():
    y = torch.relu(torch.randn(3, 8, 6, 10)).transpose(2, 3)
    s, nz = torch.ops.minaction.unit_stats(y, 2, 2)
    rs, rnz = _ref(y, 2, 2)
    torch.testing.assert_close(s, rs)
    assert torch.equal(nz, rnz)
    s, nz = torch.ops.minaction.unit_stats(torch.zeros(2, 0, 5), 2, 2)
    assert s.tolist() == [[0.0] * 5] * 2 and nz.tolist() == [0.0, 0.0]


def test_clear_errors():
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.minaction.unit_stats(torch.zeros(2, 3, dtype=torch.int32), 2, 1)
    with pytest.raises(RuntimeError, match="p 1 or 2"):
        torch.ops.minaction.unit_stats(torch.zeros(2, 3), 3, 1)
    with pytest.raises(RuntimeError, match="unit_dim"):
        torch.ops.minaction.unit_stats(torch.zeros(2, 3), 2, 2)


def test_fake_kernel_gives_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s, nz = torch.ops.minaction.unit_stats(torch.empty(3, 5, 7, 2), 2, 2)
    assert s.shape == (3, 7) and nz.shape == (3,) and s.dtype == nz.dtype == torch.float64


@pytest.mark.parametrize("arch,meta_args", [
    ("cnn", ("mnist", "vision", 10, (1, 28, 28))), ("mlp", ("mnist", "vision", 10, (1, 28, 28))),
    ("cnn", ("ecg", "physiological", 5, (1, 140)))])
@pytest.mark.parametrize("G", [1, 3])
def test_activation_stats_agree_with_the_torch_path(monkeypatch, arch, meta_args, G):
    """activation_stats through the C++ pass equals its torch-op path (float64 sums: to rounding)."""
    from minaction import models
    from minaction.data.core import DataMeta

    meta = DataMeta(*meta_args, torch.float32)
    m = models.build(arch, meta, num_models=G)
    x = torch.rand((37,) + tuple(meta.input_shape))
    fast = stats.activation_stats(m, x, output=True)
    monkeypatch.setattr(cpu_backend, "OPS", None)
    slow = stats.activation_stats(m, x, output=True)
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-7)
    assert torch.equal(fast["active_frac"], slow["active_frac"])  # exact counts both ways

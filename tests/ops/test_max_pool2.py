"""minaction.ops.max_pool2 (the cnn's pooling, C++ op ``minaction::max_pool2``) equals
F.max_pool1d/2d(x, 2) exactly: values, the element chosen (so the gradient), NaN/inf and ties,
odd sizes, every float dtype; gradcheck/gradgradcheck in float64; the fallbacks."""
import pytest
import torch
import torch.nn.functional as F

from minaction.backends import select
from minaction.ops import max_pool2

pytestmark = pytest.mark.skipif(not select.available("cpu", "cpu")[0], reason="the cpu backend does not build here")

SHAPES = [((3, 5, 28, 28), 2), ((2, 3, 7, 9), 2), ((1, 1, 3, 2), 2), ((2, 3, 40, 37), 2), ((2, 3, 2, 34), 2),
          ((4, 6, 13), 1), ((2, 2, 3), 1), ((2, 70), 1), ((3, 2, 33), 1)]


def _torch(x, dims):
    return (F.max_pool2d if dims == 2 else F.max_pool1d)(x, 2)


def _with_specials(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[::7] = 0.0  # ties (ReLU outputs are mostly ties at 0)
    for i, v in ((3, float("nan")), (5, -float("inf")), (11, float("inf")), (17, float("nan"))):
        flat[i % flat.numel()] = v
    if dtype != torch.float64:
        x = torch.relu(x)  # the cnn pools ReLU outputs: runs of equal zeros
    return x.to(dtype)


@pytest.mark.parametrize("shape,dims", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_torch_max_pool(shape, dims, dtype):
    x = _with_specials(shape, dtype, seed=len(shape) * 31 + shape[-1])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = max_pool2(xa, dims), _torch(xb, dims)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ga, = torch.autograd.grad(ya, xa, g)
    gb, = torch.autograd.grad(yb, xb, g)
    assert torch.equal(ga, gb)  # the same element chosen in every window; 0 outside the windows


def test_noncontiguous_input_and_batched_layout():
    x = torch.randn(6, 4, 30, 28).transpose(2, 3)  # a non-contiguous view
    torch.testing.assert_close(max_pool2(x, 2), F.max_pool2d(x, 2), rtol=0, atol=0)
    x = torch.randn(5, 8, 20)[:, ::2]
    torch.testing.assert_close(max_pool2(x, 1), F.max_pool1d(x, 2), rtol=0, atol=0)


@pytest.mark.parametrize("dims,shape", [(2, (2, 3, 5, 7)), (1, (2, 3, 9))])
def test_gradcheck_gradgradcheck_float64(dims, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: max_pool2(t, dims), (x,))
    assert torch.autograd.gradgradcheck(lambda t: max_pool2(t, dims), (x,))


def test_runs_the_op_and_opcheck():
    from torch.library import opcheck

    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.profiler.profile() as prof:
        max_pool2(x, 2).sum().backward()
    names = {e.name for e in prof.events()}
    assert "minaction::max_pool2" in names and "aten::max_pool2d_with_indices" not in names
    opcheck(torch.ops.minaction.max_pool2.default, (torch.randn(2, 3, 6, 7, dtype=torch.float64,
                                                                requires_grad=True), 2))
    opcheck(torch.ops.minaction.max_pool2.default, (torch.randn(3, 5, 9), 1))
    opcheck(torch.ops.minaction.maxpool2_fwd.default, (torch.randn(2, 4, 5, 4), 2))


def test_fallbacks_are_torch_and_errors_are_clear():
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(max_pool2(x, 2), F.max_pool2d(x, 2))
    xs = torch.randn(4, 3, 6, 6)
    out = torch.func.vmap(lambda t: max_pool2(t, 2))(xs)  # torch's own pooling under the transform
    torch.testing.assert_close(out, torch.stack([F.max_pool2d(t, 2) for t in xs]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="last 1 or 2 dims"):
        max_pool2(x, 3)
    with pytest.raises(RuntimeError, match="needs every pooled dim >= 2"):
        torch.ops.minaction.max_pool2(torch.randn(3, 1, 5), 2)
    with pytest.raises(RuntimeError, match="needs at least 3 dims"):
        torch.ops.minaction.max_pool2(torch.randn(4, 4), 2)

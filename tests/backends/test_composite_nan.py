"""The ``composite`` primitives (the executable spec, also the fallback the Triton and CUDA
backends use for dtypes they do not run natively) propagate NaN/Inf in the ReLU backward as
torch's ``threshold_backward`` does: a select, not a product."""
import torch

from minaction.backends import composite


def _torch_relu_grads(z, gy):
    z = z.clone().requires_grad_(True)
    y = torch.relu(z)
    (gz,) = torch.autograd.grad(y, z, gy)
    return y.detach(), gz


def test_relu_backward_matches_threshold_backward_on_nan_and_inf():
    z = torch.tensor([[[float("nan"), -1.0, 2.0, float("inf"), -float("inf"), 0.0, 3.0]]], dtype=torch.float64)
    gy = torch.tensor([[[1.5, float("nan"), 2.0, 1.0, 1.0, float("nan"), float("inf")]]], dtype=torch.float64)
    y_ref, gz_ref = _torch_relu_grads(z, gy)
    y, _, _ = composite.act_forward(z, "relu", 0, 1.0, False)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    gz = composite.act_backward(gy, torch.zeros(1, dtype=torch.float64), y, z.new_empty(0), "relu", 0, 1.0)
    torch.testing.assert_close(gz, gz_ref, equal_nan=True)
    # the NaN output passes its gradient through (the old product (y > 0) * g gave 0 there)
    assert gz[0, 0, 0] == 1.5
    # a NaN gradient where y <= 0 is dropped (the product gave NaN there)
    assert gz[0, 0, 1] == 0 and gz[0, 0, 5] == 0

"""The exceptions an energy layer raises for bad input.

``nn.Linear`` and ``nn.Conv2d`` report a wrong shape, dtype or device with ``RuntimeError``
(from the matmul or the convolution); minaction checks first and names the problem. So that
code written around ``nn.Linear`` (``except RuntimeError``) behaves the same, and code that
expects Python's usual classes does too, each of these derives from both.
"""


class InputShapeError(ValueError, RuntimeError):
    """An input (or weight, bias) of the wrong shape or on the wrong device."""


class InputTypeError(TypeError, RuntimeError):
    """An input that is not a tensor, or has a dtype the kernels do not compute in."""


__all__ = ["InputShapeError", "InputTypeError"]

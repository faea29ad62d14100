"""Test-session setup shared by every test file.

Triton reads TRITON_INTERPRET when its decorators run, so it must be set before any
kernel module is imported: without a GPU the Triton kernels run on CPU tensors under
the interpreter.
"""
import os
import sys

# tests/ on the path, so that every test folder imports the test doubles as `doubles`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("MINACTION_TEST", "1")
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

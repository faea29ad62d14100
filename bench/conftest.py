"""Benchmarks run with 2 torch threads (the project's reference machine) unless told otherwise."""
import os

import torch

torch.set_num_threads(int(os.environ.get("MINACTION_BENCH_THREADS", "2")))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

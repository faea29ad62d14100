"""pytest-benchmark timings of one training step per variant (784-512-512-10 MLP, batch 256).

    pytest bench/test_bench_core.py --benchmark-only --benchmark-group-by=group

The headline *ratio* is measured interleaved by ``bench/step_ratio.py`` (the numbers in
bench/RESULTS.md); these per-variant timings are for profiling and history
(``--benchmark-autosave``).
"""
import pytest
import torch

from step_ratio import build, make_step  # noqa: E402  (bench/ is on sys.path under pytest)

SIZES = [784, 512, 512, 10]
BATCH = 256


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (BATCH,), generator=g)


@pytest.mark.parametrize("kind", ["plain", "naive", "fused", "compiled"])
def test_step(benchmark, kind, data):
    benchmark.group = "mlp-784-512-512-10-b256-step"
    step = make_step(kind, build(kind, SIZES), 1e-3)
    x, y = data
    for _ in range(5):
        step(x, y)
    benchmark.pedantic(step, args=(x, y), rounds=50, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("kind", ["plain", "fused"])
@pytest.mark.parametrize("width", [64, 256])
def test_small_model_step(benchmark, kind, width, data):
    """The study's model sizes: where per-call overhead, not GEMM time, decides."""
    benchmark.group = f"mlp-784-{width}-{width}-10-b128-step"
    sizes = [784, width, width, 10]
    step = make_step(kind, build(kind, sizes), 1e-3)
    x, y = data[0][:128], data[1][:128]
    benchmark.pedantic(step, args=(x, y), rounds=100, iterations=1, warmup_rounds=5)

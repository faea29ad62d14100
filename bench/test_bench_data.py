"""Data loading speed (pytest-benchmark): ``pytest bench/test_bench_data.py``.

The headline: loading MNIST's training split from the decoded cache in a fresh process
state (in-process memo cleared each round) takes well under a second. Each benchmark is
skipped when its dataset cannot be obtained on this machine. Numbers: bench/RESULTS.md.
"""
from __future__ import annotations

import pytest

from minaction import data


def _ready(name):
    try:
        data.fetch(name, progress=False)
    except data.DataUnavailableError as exc:
        pytest.skip(f"{name} not reachable: {exc}")


def _cold(name, split, **opts):
    data.clear_memo()  # read the decoded cache from disk every round
    return data.load(name, split, **opts)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_train_from_disk_cache(benchmark, name):
    _ready(name)
    ds = benchmark(_cold, name, "train")
    assert len(ds) == 54_000 or len(ds) == 54_001


def test_load_mnist_train_in_process(benchmark):
    _ready("mnist")
    data.load("mnist", "train")
    ds = benchmark(data.load, "mnist", "train")
    assert len(ds) > 50_000


@pytest.mark.parametrize("name", ["sst2", "20newsgroups", "nmnist", "ecg5000"])
def test_load_other_modalities_from_disk_cache(benchmark, name):
    _ready(name)
    ds = benchmark(_cold, name, "train")
    assert len(ds) > 0


def test_subset_and_one_epoch_of_batches(benchmark):
    _ready("mnist")
    ds = data.load("mnist", "train")

    def epoch():
        n = 0
        for x, y in ds.subset(10_000, seed=1).batches(128, shuffle=True, seed=2):
            n += len(y)
        return n

    assert benchmark(epoch) == 10_000


def test_spike_batches_one_epoch(benchmark):
    _ready("mnist")
    ds = data.load("mnist_spikes", "test", T=8)

    def epoch():
        n = 0
        for x, y in ds.batches(256, shuffle=False, seed=0):
            n += len(y)
        return n

    assert benchmark(epoch) == 10_000

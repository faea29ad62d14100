"""Decoders for the native file formats of the datasets (pure numpy, no imports of the
packages the files come from).

Every decoder takes bytes (or a path) and returns numpy arrays; none of them touches the
network or the cache. Each raises :class:`FormatError` naming the problem when the input
is not in the expected format.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np


class FormatError(ValueError):
    """A file is not in the format its decoder expects."""


def _read_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        data = Path(src).read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: decompress transparently
        data = gzip.decompress(data)
    return data


# --------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(src) -> np.ndarray:
    """Decode an idx file (``*-idx3-ubyte`` / ``*-idx1-ubyte``, gzipped or not).

    Layout: two zero bytes, a type code, the number of dimensions ``d``, ``d`` big-endian
    uint32 sizes, then the values in C order.
    """
    data = _read_bytes(src)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FormatError("not an idx file: the first two bytes must be zero")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise FormatError(f"idx file has unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FormatError("idx file is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise FormatError(f"idx file holds {len(data) - header} data bytes, its header {shape} implies {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in idx format (used by tests to write fixtures)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(f">BBBB{arr.ndim}I", 0, 0, 0x08, arr.ndim, *arr.shape) + arr.tobytes()


# --------------------------------------------------------------------------- MNIST pickle (deeplearning.net)
def read_mnist_pickle(src):
    """Decode the classic ``mnist.pkl.gz``: a pickled tuple ``(train, valid, test)`` of
    ``(images float32 [N, 784] in k/256, labels int64 [N])``.

    Returns ``(x_train uint8 [60000, 28, 28], y_train, x_test uint8 [10000, 28, 28], y_test)``:
    train and valid are concatenated back into the official 60,000-image training set
    and the pixels restored to the original bytes (``k = round(256 * v)``).
    """
    data = _read_bytes(src)

    class _Restricted(pickle.Unpickler):  # only numpy arrays and tuples: never run code from a file
        _ok = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

        def find_class(self, module, name):
            if (module, name) in self._ok:
                return super().find_class(module, name)
            raise FormatError(f"MNIST pickle refers to {module}.{name}, which a data file must not")

    try:
        obj = _Restricted(io.BytesIO(data), encoding="latin1").load()
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"cannot unpickle the MNIST pickle: {exc}") from exc
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise FormatError("MNIST pickle must hold (train, valid, test), each (images, labels)")

    def images(a):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != 784:
            raise FormatError(f"MNIST pickle images must be [N, 784], got {list(a.shape)}")
        k = np.rint(a * 256.0)
        if k.min() < 0 or k.max() > 255:
            raise FormatError("MNIST pickle pixels must lie in [0, 255/256]")
        return k.astype(np.uint8).reshape(-1, 28, 28)

    (xa, ya), (xb, yb), (xt, yt) = obj
    x_train = np.concatenate([images(xa), images(xb)])
    y_train = np.concatenate([np.asarray(ya), np.asarray(yb)]).astype(np.int64)
    return x_train, y_train, images(xt), np.asarray(yt).astype(np.int64)


# --------------------------------------------------------------------------- labelled tsv (SST-2)
def read_label_tsv(src):
    """Decode a tab-separated file with a header row, a column ``label`` (int) and one text
    column (``sentence`` or ``content``; any name). Returns ``(texts list[str], labels int64)``."""
    text = _read_bytes(src).decode("utf-8")
    lines = text.splitlines()
    if not lines:
        raise FormatError("tsv file is empty")
    header = lines[0].split("\t")
    if "label" not in header or len(header) != 2:
        raise FormatError(f"tsv header must be two columns, one named 'label'; got {header}")
    li = header.index("label")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise FormatError(f"tsv line {n} has {len(parts)} fields, expected 2")
        try:
            labels.append(int(parts[li]))
        except ValueError:
            raise FormatError(f"tsv line {n}: label {parts[li]!r} is not an integer") from None
        texts.append(parts[1 - li])
    return texts, np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------- Orange .tab (20 Newsgroups)
def read_orange_tab(src, class_column="Category", text_column="Text"):
    """Decode an Orange ``.tab`` file: three header rows (names, types, flags) then one
    row per instance. Returns ``(texts list[str], class names list[str])``."""
    text = _read_bytes(src).decode("utf-8")
    lines = text.split("\n")
    if len(lines) < 3:
        raise FormatError("Orange .tab file needs three header rows")
    names = lines[0].rstrip("\r").split("\t")
    if class_column not in names or text_column not in names:
        raise FormatError(f".tab header {names} lacks {class_column!r} or {text_column!r}")
    ci, ti = names.index(class_column), names.index(text_column)
    texts, classes = [], []
    for n, line in enumerate(lines[3:], start=4):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            raise FormatError(f".tab line {n} has {len(parts)} fields, expected {len(names)}")
        classes.append(parts[ci])
        texts.append(parts[ti])
    return texts, classes


# --------------------------------------------------------------------------- N-MNIST events
def read_nmnist_events(src):
    """Decode one N-MNIST recording (5 bytes per event, big-endian bit fields):
    ``x = b0``, ``y = b1``, ``p = b2 >> 7``, ``t_us = (b2 << 16 | b3 << 8 | b4) & 0x7FFFFF``.

    Returns ``(x, y, p, t)`` as uint8, uint8, uint8, int32 arrays.
    """
    data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
    if len(data) % 5:
        raise FormatError(f"N-MNIST event file has {len(data)} bytes, not a multiple of 5")
    b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 5)
    x, y = b[:, 0].copy(), b[:, 1].copy()
    p = (b[:, 2] >> 7).astype(np.uint8)
    t = ((b[:, 2].astype(np.int32) << 16) | (b[:, 3].astype(np.int32) << 8) | b[:, 4]) & 0x7FFFFF
    return x, y, p, t


def nmnist_event_bytes(x, y, p, t) -> bytes:
    """Encode events in the N-MNIST 5-byte format (used by tests to write fixtures)."""
    x, y, p, t = (np.asarray(a, dtype=np.int64) for a in (x, y, p, t))
    b = np.empty((len(x), 5), dtype=np.uint8)
    b[:, 0], b[:, 1] = x, y
    b[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    b[:, 3] = (t >> 8) & 0xFF
    b[:, 4] = t & 0xFF
    return b.tobytes()


def read_label_list(src):
    """Decode a slayer label list (``#sample #class`` header, then ``id<TAB>class`` rows).
    Returns ``(ids int64, labels int64)``."""
    text = _read_bytes(src).decode("utf-8")
    ids, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FormatError(f"label list line {n}: expected 'id class', got {line!r}")
        ids.append(int(parts[0]))
        labels.append(int(parts[1]))
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def bin_events(events, offsets, n_samples, T, height=34, width=34, duration_us=None,
               chunk_bins: int = 1 << 20) -> np.ndarray:
    """Count events per (sample, time bin, polarity, y, x): float32 ``[N, T, 2, H, W]``.

    ``events``: ``(x, y, p, t)`` concatenated over samples (any integer dtypes); ``offsets``:
    ``[N + 1]`` start positions. Time bins split ``[0, duration)`` into ``T`` equal parts,
    ``duration`` being ``duration_us`` when given (events after it are dropped) or, per
    recording, its last timestamp + 1 (so every event of a recording lands in a bin).

    Samples are binned in chunks of about ``chunk_bins`` output bins, so the int64 index
    arithmetic and the counts stay in cache and the whole-split int64 temporaries (~0.7 s
    of page faults and copies for N-MNIST's 900 training recordings) are never made.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if duration_us is not None and duration_us <= 0:
        raise ValueError(f"duration_us must be > 0, got {duration_us}")
    x, y, p, t = events
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) != n_samples + 1 or (n_samples and (offsets[0] != 0 or np.any(np.diff(offsets) < 0))):
        raise ValueError(f"offsets must be {n_samples + 1} non-decreasing start positions from 0, "
                         f"got {len(offsets)} values")
    per = int(T) * 2 * int(height) * int(width)
    out = np.empty((n_samples, T, 2, height, width), dtype=np.float32)
    step = max(1, int(chunk_bins) // per)
    for s0 in range(0, n_samples, step):
        s1 = min(n_samples, s0 + step)
        e0, e1 = int(offsets[s0]), int(offsets[s1])
        sample = np.repeat(np.arange(s1 - s0, dtype=np.int64), np.diff(offsets[s0:s1 + 1]))
        tt = t[e0:e1].astype(np.int64)
        if duration_us is None:
            # last timestamp of each recording (events are not assumed sorted)
            last = np.zeros(s1 - s0, dtype=np.int64)
            if len(tt):
                np.maximum.at(last, sample, tt)
            dur = last[sample] + 1
            keep = None
        else:
            dur = np.int64(duration_us)
            keep = tt < duration_us
        tb = np.minimum(tt * T // dur, T - 1)
        xx, yy = x[e0:e1].astype(np.int64), y[e0:e1].astype(np.int64)
        inside = (xx < width) & (yy < height)
        if keep is not None:
            inside &= keep
        flat = (((sample * T + tb) * 2 + p[e0:e1].astype(np.int64)) * height + yy) * width + xx
        counts = np.bincount(flat[inside], minlength=(s1 - s0) * per)
        out[s0:s1] = counts.reshape((s1 - s0, T, 2, height, width))
    return out


# --------------------------------------------------------------------------- UCR tsv
def read_ucr_tsv(src):
    """Decode a UCR archive ``.tsv``: one series per row, the class label first, then the
    values, tab-separated. Returns ``(series float32 [N, L], labels as read (float64))``."""
    text = _read_bytes(src).decode("utf-8")
    rows = [r for r in text.splitlines() if r.strip()]
    if not rows:
        raise FormatError("UCR tsv file is empty")
    try:
        arr = np.array([[float(v) for v in r.split("\t")] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise FormatError(f"UCR tsv holds a non-numeric value or ragged rows: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise FormatError("UCR tsv rows must hold a label and at least one value")
    series = arr[:, 1:].astype(np.float32)
    if np.isnan(series).any():
        raise FormatError("UCR tsv holds missing values (NaN); variable-length series are not supported")
    return series, arr[:, 0]

"""Decoders: the files a source gives (``{key: bytes}``) -> the arrays a dataset family caches.

Each decoder's ``__name__`` is part of its decoded-cache file name
(:meth:`minaction.data.catalogue.Candidate.cache_path`): renaming one abandons the caches
already written.
"""
from __future__ import annotations

import io
import tarfile
from typing import Dict

import numpy as np

from . import formats, text


def _decode_idx4(files):
    return {"x_train": formats.read_idx(files["train_images"]), "y_train": formats.read_idx(files["train_labels"]),
            "x_test": formats.read_idx(files["test_images"]), "y_test": formats.read_idx(files["test_labels"])}


def _decode_mnist_pickle(files):
    xtr, ytr, xte, yte = formats.read_mnist_pickle(files["pickle"])
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _corpus_arrays(texts_by_split, labels_by_split, classes=None):
    texts, labels, split = [], [], []
    for s, (tx, lb) in enumerate(zip(texts_by_split, labels_by_split)):
        texts += list(tx)
        labels.append(np.asarray(lb, dtype=np.int64))
        split.append(np.full(len(tx), s, dtype=np.int8))
    words, ids, offsets = text.tokenize_corpus(texts)
    out = {"words": np.array("\n".join(words)), "ids": ids, "offsets": offsets,
           "labels": np.concatenate(labels), "split": np.concatenate(split)}
    if classes is not None:
        out["classes"] = np.array("\n".join(classes))
    return out


def _decode_sst2(files):
    parts = [formats.read_label_tsv(files[k]) for k in ("train", "dev", "test")]
    return _corpus_arrays([p[0] for p in parts], [p[1] for p in parts])


def _decode_20ng(files):
    (tr_x, tr_c), (te_x, te_c) = (formats.read_orange_tab(files[k]) for k in ("train", "test"))
    classes = sorted(set(tr_c))
    if set(te_c) - set(classes):
        raise formats.FormatError(f"test classes absent from training: {sorted(set(te_c) - set(classes))}")
    lut = {c: i for i, c in enumerate(classes)}
    return _corpus_arrays([tr_x, te_x], [[lut[c] for c in tr_c], [lut[c] for c in te_c]], classes)


def _decode_nmnist_tar(files):
    members: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(files["tarball"]), mode="r:*") as tar:
        for m in tar.getmembers():
            if m.isfile():
                members[m.name.rsplit("/", 1)[-1]] = tar.extractfile(m).read()
    return _decode_nmnist_members(members)


def _decode_nmnist_tree(files):
    return _decode_nmnist_members(files["tree"])


def _decode_nmnist_members(members):
    for need in ("train1K.txt", "test100.txt"):
        if need not in members:
            raise formats.FormatError(f"N-MNIST archive lacks {need}")
    ids_all, labels_all, split_all = [], [], []
    xs, ys, ps, ts, offsets = [], [], [], [], [0]
    for s, listing in enumerate(("train1K.txt", "test100.txt")):
        ids, labels = formats.read_label_list(members[listing])
        for i in ids:
            name = f"{i}.bs2"
            if name not in members:
                raise formats.FormatError(f"N-MNIST archive lacks recording {name} named in {listing}")
            x, y, p, t = formats.read_nmnist_events(members[name])
            xs.append(x), ys.append(y), ps.append(p), ts.append(t)
            offsets.append(offsets[-1] + len(x))
        ids_all.append(ids), labels_all.append(labels), split_all.append(np.full(len(ids), s, dtype=np.int8))
    return {"ex": np.concatenate(xs), "ey": np.concatenate(ys), "ep": np.concatenate(ps), "et": np.concatenate(ts),
            "offsets": np.asarray(offsets, dtype=np.int64), "ids": np.concatenate(ids_all),
            "labels": np.concatenate(labels_all), "split": np.concatenate(split_all)}


def _decode_ucr(files):
    xtr, ltr = formats.read_ucr_tsv(files["train"])
    xte, lte = formats.read_ucr_tsv(files["test"])
    if xtr.shape[1] != xte.shape[1]:
        raise formats.FormatError(f"UCR train series have length {xtr.shape[1]}, test {xte.shape[1]}")
    classes = np.unique(np.concatenate([ltr, lte]))
    return {"x_train": xtr, "y_train": np.searchsorted(classes, ltr).astype(np.int64),
            "x_test": xte, "y_test": np.searchsorted(classes, lte).astype(np.int64), "classes": classes}

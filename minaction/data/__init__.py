"""Real datasets for the four modalities of the study, loaded offline where possible.

>>> from minaction import data
>>> ds = data.load("mnist", "train")          # Dataset: ds.x [54000, 1, 28, 28], ds.y [54000]
>>> ds.meta.num_classes, ds.meta.input_shape  # (10, (1, 28, 28))
>>> for xb, yb in ds.subset(5000).batches(128, seed=0): ...

Names: ``mnist``, ``fashion_mnist`` (vision); ``sst2``, ``20newsgroups`` (text);
``nmnist``, ``mnist_spikes``, ``fashion_mnist_spikes`` (neuromorphic); ``ecg5000``,
``ecg200``, ``eog_horizontal`` (physiological). See docs/data.md for sources, checksums,
splits, the tokenizer and every option. Other datasets join through
:func:`register_dataset`.

Inside: :mod:`.catalogue` (which datasets exist, their files, checksums and sources),
:mod:`.sources` (fetching), :mod:`.decoders` (files -> arrays), :mod:`.cache` (the decoded
arrays on disk, under a file lock), :mod:`.splits` (arrays -> train/val/test datasets).
"""
from __future__ import annotations

from typing import Dict, List

from .cache import clear_memo, family_arrays
from . import catalogue as _catalogue
from .catalogue import FAMILIES, SPECS, register_dataset
from .core import DataMeta, Dataset, SpikeDataset
from .formats import FormatError
from .sources import ChecksumError, DataError, DataUnavailableError, cache_dir
from .splits import SPLITS, check_data_dir
from .splits import load as _load

__all__ = ["load", "DataMeta", "Dataset", "SpikeDataset", "list_datasets", "fetch", "cache_dir",
           "DataError", "ChecksumError", "DataUnavailableError", "FormatError", "SPLITS", "register_dataset"]


def load(name: str, split: str, data_dir=None, seed: int = 0, **opts) -> Dataset:
    """Load split ``split`` (``"train"``, ``"val"`` or ``"test"``) of dataset ``name``.

    ``data_dir`` (or ``$MINACTION_DATA``) is searched first for the dataset's files; then
    the package/file this machine can reach; then the upstream URL. Every file is checked
    against its pinned sha256 (:class:`ChecksumError` on a mismatch); decoded arrays are
    cached under ``$MINACTION_CACHE`` (default ``~/.cache/minaction``).

    ``seed`` fixes the validation split carved (stratified, ``val_fraction`` of each class,
    default 0.1) from the official training set where the dataset has no official one
    (all but SST-2); the train split is the rest, so train + val = the official training set.

    Options (``**opts``) per dataset — ``val_fraction``; text: ``min_freq`` (2), ``max_size``
    (20000), ``max_len`` (64 for sst2, 256 for 20newsgroups); ``nmnist``: ``T`` (8),
    ``duration_us`` (None: each recording's own span), ``fold_time`` (False; True: the T bins
    become channels, input ``(1, 2T, 34, 34)``); ``*_spikes``: ``T`` (8), ``max_prob``
    (1.0); physiological: ``standardize`` (True). ``progress=True`` prints download progress.
    """
    return _load(name, split, data_dir=data_dir, seed=seed, **opts)


def list_datasets() -> List[Dict[str, object]]:
    """One dict per dataset: name, modality, description, options (defaults), whether
    decoded arrays are already in the cache, and the sources tried. Datasets added with
    :func:`register_dataset` come last (``registered: True``; their loader owns their data, so
    ``modality`` and ``cached`` are None: nothing is loaded to list them)."""
    out = []
    for spec in SPECS.values():
        fam = FAMILIES[spec.family]
        cached = any(c.cache_path(spec.family).is_file() for c in fam.candidates)
        out.append({"name": spec.name, "modality": spec.modality, "description": spec.description,
                    "options": dict(spec.defaults), "cached": cached, "registered": False,
                    "sources": [f"{c.source.describe()} [{', '.join(sp.names[0] for sp in c.specs)}]"
                                for c in fam.candidates]})
    for reg in _catalogue.REGISTERED.values():
        where = f"{reg.module}.{getattr(reg.load, '__qualname__', reg.load)}" if reg.module else repr(reg.load)
        out.append({"name": reg.name, "modality": None, "description": f"registered with register_dataset by {where}",
                    "options": {}, "cached": None, "registered": True, "sources": [f"the registered loader {where}"]})
    return out


_known_names = _catalogue.known_names


def fetch(*names: str, data_dir=None, progress: bool = True, refresh: bool = False) -> Dict[str, str]:
    """Obtain, verify, decode and cache the named datasets (all when none are named).

    Returns ``{name: where the data came from}``; raises the first error met
    (:class:`DataUnavailableError` lists every source tried). A dataset added with
    :func:`register_dataset` is checked by loading its splits through its loader (which
    owns its data: nothing is cached here)."""
    registered = _catalogue.REGISTERED
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"fetch takes dataset names as separate strings (fetch('mnist', 'sst2')), got "
                        f"{type(bad[0]).__name__} {bad[0]!r}")
    names = names or tuple(_known_names())
    out = {}
    for n in names:
        if n in registered:
            reg = registered[n]
            for split in SPLITS:
                reg.load(n, split, data_dir=data_dir)
            out[n] = f"the registered loader of {reg.module or '?'}"
            continue
        if n not in SPECS:
            raise ValueError(f"unknown dataset {n!r}; known: {', '.join(_known_names())}")
        check_data_dir(n, data_dir)
        _, origin = family_arrays(SPECS[n].family, data_dir=data_dir, progress=progress, refresh=refresh)
        out[n] = origin
    return out

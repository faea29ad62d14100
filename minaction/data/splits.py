"""Split builders: a family's cached arrays -> one split (train / val / test) of a dataset
name as a :class:`~minaction.data.Dataset`, and :func:`load`, which picks the builder."""
from __future__ import annotations

import numbers
import operator
import os

import numpy as np
import torch

from . import formats, text
from .cache import family_arrays
from .catalogue import REGISTERED, SPECS, known_names
from .core import DataMeta, Dataset, SpikeDataset, carve_val

SPLITS = ("train", "val", "test")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _nonempty(tr, va, split, val_fraction):
    """A split that carve_val left empty is an error that says why (an empty train split made every
    standardised value NaN)."""
    if split == "val" and len(va) == 0:
        raise ValueError("split 'val' is empty: " + ("val_fraction is 0" if not val_fraction else
                         f"val_fraction={val_fraction} of {len(tr)} training samples rounds to none"))
    if len(tr) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples (all {len(va)} went to val)")


def _train_val(y_train, split, seed, val_fraction):
    tr, va = carve_val(y_train, val_fraction, seed)
    _nonempty(tr, va, split, val_fraction)
    return tr if split == "train" else va


def _vision_arrays(name, split, seed, val_fraction, data_dir, progress):
    a, origin = family_arrays(name, data_dir, progress)
    if split == "test":
        x, y = a["x_test"], a["y_test"]
    else:
        idx = _train_val(a["y_train"], split, seed, val_fraction)
        x, y = a["x_train"][idx], a["y_train"][idx]
    return x, y, origin


def _build_vision(name, split, seed, data_dir, progress, val_fraction):
    x, y, origin = _vision_arrays(name, split, seed, val_fraction, data_dir, progress)
    xt = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1).to(torch.float32).div_(255.0)
    meta = DataMeta(name, "vision", 10, (1, 28, 28), torch.float32,
                    extra={"origin": origin, "val_fraction": val_fraction, "seed": seed, "scale": "pixel / 255"})
    return Dataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), meta, split)


def _build_spikes(name, split, seed, data_dir, progress, val_fraction, T, max_prob):
    base = name[: -len("_spikes")]
    if int(T) < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0.0 < float(max_prob) <= 1.0:
        raise ValueError(f"max_prob must be in (0, 1], got {max_prob}")
    x, y, origin = _vision_arrays(base, split, seed, val_fraction, data_dir, progress)
    xt = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1).to(torch.float32).div_(255.0)
    meta = DataMeta(name, "neuromorphic", 10, (int(T), 1, 28, 28), torch.float32, spike_encoded=True,
                    extra={"origin": origin, "source_dataset": base, "encoding": "rate (Bernoulli per step)",
                           "label": "spike-encoded", "T": int(T), "max_prob": float(max_prob),
                           "val_fraction": val_fraction, "seed": seed})
    return SpikeDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), meta, split)


def _build_text(name, split, seed, data_dir, progress, val_fraction, min_freq, max_size, max_len):
    a, origin = family_arrays(name, data_dir, progress)
    words = str(a["words"]).split("\n") if a["words"].size and str(a["words"]) else []
    n_words = len(words)
    split_of_doc, labels = a["split"], a["labels"]
    if "classes" in a:  # 20 Newsgroups: splits 0 train, 1 test; carve val from train
        train_docs = np.flatnonzero(split_of_doc == 0)
        tr, va = carve_val(labels[train_docs], val_fraction, seed)
        docs = {"train": train_docs[tr], "val": train_docs[va], "test": np.flatnonzero(split_of_doc == 1)}
        classes = str(a["classes"]).split("\n")
    else:  # SST-2: official dev is the val split
        docs = {s: np.flatnonzero(split_of_doc == i) for i, s in enumerate(SPLITS)}
        classes = ["negative", "positive"]
        val_fraction = None
    if split == "val" and len(docs["val"]) == 0:
        raise ValueError("split 'val' is empty: val_fraction is 0")
    kept = text.build_vocab(a["ids"], a["offsets"], docs["train"], n_words, min_freq, max_size)
    ids = text.encode_docs(a["ids"], a["offsets"], docs[split], kept, n_words, max_len)
    vocab = ["<pad>", "<unk>"] + [words[i] for i in kept]
    meta = DataMeta(name, "text", len(classes), (int(max_len),), torch.int64, vocab_size=len(vocab),
                    extra={"origin": origin, "classes": tuple(classes), "tokenizer": "lowercase regex words "
                           "(minaction.data.text.TOKEN_RE)", "min_freq": min_freq, "max_size": max_size,
                           "max_len": int(max_len), "pad_id": 0, "unk_id": 1, "val_fraction": val_fraction,
                           "seed": seed})
    return Dataset(torch.from_numpy(ids), torch.from_numpy(labels[docs[split]].copy()), meta, split, vocab=vocab)


def _build_nmnist(name, split, seed, data_dir, progress, val_fraction, T, duration_us, fold_time=False):
    a, origin = family_arrays(name, data_dir, progress)
    split_of = a["split"]
    train_s = np.flatnonzero(split_of == 0)
    if split == "test":
        sel = np.flatnonzero(split_of == 1)
    else:
        sel = train_s[_train_val(a["labels"][train_s], split, seed, val_fraction)]
    offsets = a["offsets"]
    starts, ends = offsets[sel], offsets[sel + 1]
    lengths = ends - starts
    take = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    events = (a["ex"][take], a["ey"][take], a["ep"][take], a["et"][take])  # bin_events widens them per chunk
    sub_off = np.concatenate([[0], np.cumsum(lengths)])
    x = formats.bin_events(events, sub_off, len(sel), int(T), duration_us=duration_us)
    if not isinstance(fold_time, bool):
        raise TypeError(f"fold_time must be True or False, got {fold_time!r}")
    shape = (int(T), 2, 34, 34)
    if fold_time:  # the T bins become channels (bin-major): one time step, nothing for a stem to average away
        shape = (1, 2 * int(T), 34, 34)
        x = x.reshape((len(sel),) + shape)
    meta = DataMeta(name, "neuromorphic", 10, shape, torch.float32,
                    extra={"origin": origin, "T": int(T), "duration_us": duration_us, "fold_time": fold_time,
                           "binning": "event counts per (time bin, polarity, y, x)" + (
                               "; channel = 2 * time bin + polarity" if fold_time else ""),
                           "recording": "DVS (real)", "val_fraction": val_fraction, "seed": seed})
    ds = Dataset(torch.from_numpy(x), torch.from_numpy(a["labels"][sel].copy()), meta, split)
    ds.sample_ids = torch.from_numpy(a["ids"][sel].copy())
    return ds


def _build_ucr(name, split, seed, data_dir, progress, val_fraction, standardize):
    a, origin = family_arrays(name, data_dir, progress)
    tr, va = carve_val(a["y_train"], val_fraction, seed)
    _nonempty(tr, va, split, val_fraction)
    x_train = a["x_train"][tr]
    mean, std = float(x_train.mean()), float(x_train.std())
    x, y = {"train": (x_train, a["y_train"][tr]), "val": (a["x_train"][va], a["y_train"][va]),
            "test": (a["x_test"], a["y_test"])}[split]
    x = x.astype(np.float32)
    if standardize:
        x = (x - mean) / (std if std > 0 else 1.0)
    L = a["x_train"].shape[1]
    meta = DataMeta(name, "physiological", int(len(a["classes"])), (1, int(L)), torch.float32,
                    extra={"origin": origin, "standardize": bool(standardize), "train_mean": mean, "train_std": std,
                           "classes": tuple(float(c) for c in a["classes"]), "val_fraction": val_fraction,
                           "seed": seed})
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(y.copy()), meta, split)


BUILDERS = {"vision": _build_vision, "spikes": _build_spikes, "text": _build_text, "nmnist": _build_nmnist,
            "ucr": _build_ucr}


def load(name: str, split: str, data_dir=None, seed: int = 0, progress: bool = False, **opts) -> Dataset:
    """Load one split of a dataset (see :func:`minaction.data.load`); a registered dataset
    (:func:`minaction.data.register_dataset`) by its own loader."""
    if name in REGISTERED:
        _check_split(split)
        ds = REGISTERED[name].load(name, split, data_dir=data_dir, seed=seed, **opts)
        if not isinstance(ds, Dataset) and not all(hasattr(ds, a) for a in ("x", "y", "meta")):
            raise TypeError(f"the loader registered for dataset {name!r} returned a {type(ds).__name__}, not a "
                            f"minaction.data.Dataset (Dataset(x, y, meta, split); docs/data.md)")
        return ds
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_names())}")
    _check_split(split)
    spec = SPECS[name]
    check_options(name, opts, seed)
    check_data_dir(name, data_dir)
    kw = {**spec.defaults, **opts}
    return BUILDERS[spec.builder](name, split, seed, data_dir, progress, **kw)


def check_data_dir(name: str, data_dir) -> None:
    """A ``data_dir`` that is not a folder is an error: a typo was ignored silently wherever another source
    (or the decoded cache) had the data."""
    if data_dir is not None and not os.path.isdir(os.path.expanduser(os.fspath(data_dir))):
        raise FileNotFoundError(f"dataset {name!r}: data_dir {str(data_dir)!r} is not a folder")


def check_options(name: str, opts: dict, seed=0) -> None:
    """The options ``opts`` of catalogue dataset ``name``, as :func:`load` takes them: names it takes
    (``TypeError`` otherwise), each of the type its default has. :func:`load` checks them before any file
    is read, and the study before anything runs."""
    defaults = SPECS[name].defaults
    unknown = set(opts) - set(defaults)
    if unknown:
        raise TypeError(f"dataset {name!r} takes no option(s) {sorted(unknown)}; its options: {sorted(defaults)}")
    _check_option_values(name, seed, opts, defaults)


#: each option's valid values, as the builders check them when they run (T = -1 passed the type check and
#: failed every run of a study in its worker)
_OPTION_RANGES = {
    "val_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "T": (lambda v: v >= 1, ">= 1"),
    "max_prob": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "duration_us": (lambda v: v > 0, "> 0"),
    "min_freq": (lambda v: v >= 1, ">= 1"),
    "max_size": (lambda v: v >= 3, ">= 3 (two reserved ids and one token)"),
    "max_len": (lambda v: v >= 1, ">= 1"),
}


def _check_option_values(name, seed, opts, defaults) -> None:
    """Each option of the type its default has: T=2.7 became 2, standardize="False" standardised, seed=1.5 was
    recorded as given, and val_fraction="0.1" failed deep inside with a comparison error."""
    def integral(v):
        if isinstance(v, bool):
            return False
        try:
            operator.index(v)
            return True
        except TypeError:
            return False

    if not integral(seed):
        raise TypeError(f"dataset {name!r}: seed must be an integer, got {seed!r}")
    if seed < 0:  # numpy's generators take none (it failed after the files were read, and only where a split is carved)
        raise ValueError(f"dataset {name!r}: seed must be >= 0, got {seed!r}")
    for k, v in opts.items():
        d = defaults.get(k)
        if v is None and d is None:
            continue
        if isinstance(d, bool):
            ok, what = isinstance(v, bool), "True or False"
        elif isinstance(d, int):
            ok, what = integral(v), "an integer"
        else:  # a float, or None standing for one (val_fraction, duration_us)
            ok, what = isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"
        if not ok:
            raise TypeError(f"dataset {name!r}: option {k} must be {what}, got {v!r}")
    for k, v in opts.items():  # values the builders would refuse, refused here (the study checks before it runs)
        rule = _OPTION_RANGES.get(k)
        if rule is not None and v is not None and not rule[0](v):
            raise ValueError(f"dataset {name!r}: option {k} must be {rule[1]}, got {v!r}")
    if "val_fraction" in defaults and defaults["val_fraction"] is None and opts.get("val_fraction") is not None:
        raise ValueError(f"dataset {name!r}: its val split is an official one (sst2: the dev set), so val_fraction "
                         f"must stay None, got {opts['val_fraction']!r}")

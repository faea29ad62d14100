"""``minaction.data.load`` end to end on fixtures written in each native format.

The catalogue's pinned checksums are swapped for the fixtures' own (monkeypatch), its
sources for the fixture folder, and the cache for a temporary one: no real data, no network.
"""
import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from minaction import data
from minaction.data import catalogue, decoders, formats, sources
from minaction.data.catalogue import Candidate, Family
from minaction.data.sources import DirSource, FileSpec, UrlSource

N_CLASSES = 10


def _sha(b):
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MINACTION_DATA", raising=False)
    monkeypatch.setenv("MINACTION_SHARED_DATA", str(tmp_path / "no-shared"))
    data.clear_memo()
    yield
    data.clear_memo()


def _install(monkeypatch, family, files, decode, folder):
    """Write ``files`` ({name: bytes}) into ``folder`` and make ``family`` read exactly them."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for key, (name, blob) in files.items():
        (folder / name).write_bytes(blob)
        specs.append(FileSpec(key, [name], _sha(blob)))
    cand = Candidate(DirSource(kind="user"), specs, decode)
    monkeypatch.setitem(catalogue.FAMILIES, family, Family(family, [cand], "fixture"))
    return specs


def _vision_fixture(monkeypatch, tmp_path, family="mnist", n_train=200, n_test=50):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ytr = (np.arange(n_train) % N_CLASSES).astype(np.uint8)
    xte = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yte = (np.arange(n_test) % N_CLASSES).astype(np.uint8)
    files = {"train_images": ("train-images-idx3-ubyte.gz", gzip.compress(formats.idx_bytes(xtr))),
             "train_labels": ("train-labels-idx1-ubyte.gz", gzip.compress(formats.idx_bytes(ytr))),
             "test_images": ("t10k-images-idx3-ubyte.gz", gzip.compress(formats.idx_bytes(xte))),
             "test_labels": ("t10k-labels-idx1-ubyte.gz", gzip.compress(formats.idx_bytes(yte)))}
    _install(monkeypatch, family, files, decoders._decode_idx4, tmp_path / "d")
    return xtr, ytr, xte, yte


def test_vision_splits_layout_and_seeded_val(monkeypatch, tmp_path):
    xtr, ytr, xte, yte = _vision_fixture(monkeypatch, tmp_path)
    d = tmp_path / "d"
    tr, va, te = (data.load("mnist", s, data_dir=d) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (180, 20, 50)
    assert tr.x.shape == (180, 1, 28, 28) and tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert 0.0 <= float(tr.x.min()) and float(tr.x.max()) <= 1.0
    torch.testing.assert_close(te.x[:, 0], torch.from_numpy(xte).float() / 255)
    assert torch.bincount(va.y, minlength=10).tolist() == [2] * 10  # stratified
    assert tr.meta == data.DataMeta("mnist", "vision", 10, (1, 28, 28), torch.float32, extra=tr.meta.extra)
    assert hash(tr.meta) == hash(va.meta)  # usable as a key (extra is not hashed)
    assert (tr.num_classes, tr.modality, tr.input_shape) == (10, "vision", (1, 28, 28))
    # val is disjoint from train, reproducible by seed, different for another seed
    all_rows = {bytes(r) for r in (xtr)}
    tr_rows = {bytes((r * 255).round().byte().numpy()) for r in tr.x[:, 0]}
    va_rows = {bytes((r * 255).round().byte().numpy()) for r in va.x[:, 0]}
    assert not (tr_rows & va_rows) and (tr_rows | va_rows) == all_rows
    assert torch.equal(data.load("mnist", "val", data_dir=d, seed=0).x, va.x)
    assert not torch.equal(data.load("mnist", "val", data_dir=d, seed=1).x, va.x)
    full = data.load("mnist", "train", data_dir=d, val_fraction=0.0)
    assert len(full) == 200
    with pytest.raises(ValueError, match="empty"):
        data.load("mnist", "val", data_dir=d, val_fraction=0.0)


def test_second_load_comes_from_the_decoded_cache(monkeypatch, tmp_path):
    _vision_fixture(monkeypatch, tmp_path)
    first = data.load("mnist", "test", data_dir=tmp_path / "d")
    assert "decoded cache" not in first.meta.extra["origin"]
    for f in (tmp_path / "d").iterdir():  # the source may vanish: the cache is enough
        f.unlink()
    data.clear_memo()
    again = data.load("mnist", "test", data_dir=tmp_path / "d")
    assert "decoded cache" in again.meta.extra["origin"]
    assert torch.equal(first.x, again.x)


def test_batches_and_subset(monkeypatch, tmp_path):
    _vision_fixture(monkeypatch, tmp_path)
    ds = data.load("mnist", "train", data_dir=tmp_path / "d")
    bs = list(ds.batches(64, shuffle=True, seed=3))
    assert [len(y) for _, y in bs] == [64, 64, 52]
    xs = torch.cat([x for x, _ in bs])
    assert xs.shape == (180, 1, 28, 28)
    assert sorted(x.sum().item() for x in xs) == pytest.approx(sorted(x.sum().item() for x in ds.x))
    again = list(ds.batches(64, shuffle=True, seed=3))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(bs, again))
    assert [len(y) for _, y in ds.batches(64, shuffle=False, drop_last=True)] == [64, 64]
    first, _ = next(ds.batches(10, shuffle=False))
    assert torch.equal(first, ds.x[:10])
    sub = ds.subset(30, seed=1)
    assert len(sub) == 30 and sub.meta is ds.meta
    assert torch.equal(sub.y, ds.subset(30, seed=1).y)
    assert ds.subset(10_000) is ds
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_spike_encoded_variant(monkeypatch, tmp_path):
    _vision_fixture(monkeypatch, tmp_path)
    ds = data.load("mnist_spikes", "test", data_dir=tmp_path / "d", T=5)
    assert ds.meta.spike_encoded and ds.meta.modality == "neuromorphic"
    assert ds.meta.input_shape == (5, 1, 28, 28) and ds.meta.extra["label"] == "spike-encoded"
    assert ds.x.shape == (50, 1, 28, 28)  # images; spikes are never materialised
    x1, y1 = next(ds.batches(16, shuffle=False, seed=7))
    x2, _ = next(ds.batches(16, shuffle=False, seed=7))
    x3, _ = next(ds.batches(16, shuffle=False, seed=8))
    assert x1.shape == (16, 5, 1, 28, 28) and x1.dtype == torch.float32
    assert set(x1.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    # rate coding: the firing rate follows the intensity
    rate = x1.mean(1)
    img = ds.x[:16]
    assert float((rate - img).abs().mean()) < 0.2
    assert float(rate[img == 0].sum()) == 0.0
    assert data.load("mnist_spikes", "test", data_dir=tmp_path / "d", T=5).subset(8).meta.spike_encoded


def _write_mnist_pickle(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    parts = tuple(((rng.integers(0, 256, (k, 784)) / 256).astype(np.float32), np.arange(k) % 10)
                  for k in (40, 10, 20))
    blob = gzip.compress(pickle.dumps(parts, protocol=2))
    _install(monkeypatch, "mnist", {"pickle": ("mnist.pkl.gz", blob)}, decoders._decode_mnist_pickle, tmp_path / "d")
    return parts


def test_mnist_pickle_route(monkeypatch, tmp_path):
    parts = _write_mnist_pickle(tmp_path, monkeypatch)
    tr = data.load("mnist", "train", data_dir=tmp_path / "d", val_fraction=0.0)
    assert len(tr) == 50 and len(data.load("mnist", "test", data_dir=tmp_path / "d")) == 20
    torch.testing.assert_close(tr.x[:40].reshape(40, -1), torch.from_numpy(parts[0][0]) * 256 / 255)


def test_checksum_mismatch_is_an_error(monkeypatch, tmp_path):
    specs = _vision_fixture(monkeypatch, tmp_path)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 4))
    with pytest.raises(data.ChecksumError, match="t10k-labels|test_labels"):
        data.load("mnist", "test", data_dir=tmp_path / "d")


def test_content_hash_accepts_recompressed_and_plain_idx(tmp_path):
    raw = formats.idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    spec = FileSpec("k", ["a-idx1-ubyte.gz"], _sha(raw), content_hash=True)
    assert sources.verify(gzip.compress(raw, mtime=0), spec, "x") == raw
    assert sources.verify(gzip.compress(raw, compresslevel=1, mtime=123), spec, "x") == raw
    (tmp_path / "a-idx1-ubyte").write_bytes(raw)  # plain copy found under the .gz name's stem
    got = DirSource(kind="user", data_dir=tmp_path).fetch([spec])
    assert got["k"] == raw


def test_nothing_works_lists_every_source(monkeypatch, tmp_path):
    spec = FileSpec("k", ["f.bin"], "0" * 64)
    cands = [Candidate(DirSource(label="data_dir / $MINACTION_DATA", kind="user"), [spec], decoders._decode_idx4),
             Candidate(DirSource(label="shared data folder", kind="shared"), [spec], decoders._decode_idx4),
             Candidate(UrlSource(urls={"k": (tmp_path / "absent.bin").as_uri()}, folder="t"), [spec],
                       decoders._decode_idx4)]
    monkeypatch.setitem(catalogue.FAMILIES, "mnist", Family("mnist", cands))
    (tmp_path / "nowhere").mkdir()  # a folder without the files (one that does not exist is refused at once)
    with pytest.raises(data.DataUnavailableError) as err:
        data.load("mnist", "train", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert "data_dir / $MINACTION_DATA" in msg and "shared data folder" in msg and "absent.bin" in msg
    assert msg.count("\n  - ") == 3


def test_url_source_downloads_verifies_and_caches(monkeypatch, tmp_path):
    blob = b"payload"
    (tmp_path / "up.bin").write_bytes(blob)
    src = UrlSource(urls={"k": (tmp_path / "up.bin").as_uri()}, folder="t")
    spec = FileSpec("k", ["up.bin"], _sha(blob))
    assert src.fetch([spec], progress=False) == {"k": blob}
    (tmp_path / "up.bin").unlink()
    assert src.fetch([spec], progress=False) == {"k": blob}  # from the download cache
    bad = FileSpec("k", ["up.bin"], "1" * 64)
    (tmp_path / "up.bin").write_bytes(blob)
    with pytest.raises(data.ChecksumError):
        src.fetch([bad], progress=False)


def _text_fixture(monkeypatch, tmp_path):
    train = "label\tsentence\n" + "".join(
        f"{i % 2}\t{'great fun film' if i % 2 else 'dull boring film'} w{i}\n" for i in range(40))
    dev = "label\tcontent\n1\tGreat FUN!\n0\tdull , zzzunseen\n"
    test = "label\tcontent\n1\tfun fun fun fun fun\n"
    files = {k: (f"{k}.tsv", v.encode()) for k, v in (("train", train), ("dev", dev), ("test", test))}
    folder = tmp_path / "d" / "sst2"
    folder.mkdir(parents=True)
    specs = []
    for key, (name, blob) in files.items():
        (folder / name).write_bytes(blob)
        specs.append(FileSpec(key, [name], _sha(blob)))
    cand = Candidate(DirSource(kind="user", subdirs=("sst2",), search_root=False), specs, decoders._decode_sst2)
    monkeypatch.setitem(catalogue.FAMILIES, "sst2", Family("sst2", [cand]))


def test_text_vocab_from_train_only_and_padding(monkeypatch, tmp_path):
    _text_fixture(monkeypatch, tmp_path)
    d = tmp_path / "d"
    tr = data.load("sst2", "train", data_dir=d, max_len=6)
    va = data.load("sst2", "val", data_dir=d, max_len=6)
    te = data.load("sst2", "test", data_dir=d, max_len=3)
    assert (len(tr), len(va), len(te)) == (40, 2, 1)
    assert tr.x.shape == (40, 6) and tr.x.dtype == torch.int64 and tr.meta.input_shape == (6,)
    # w0..w39 appear once each: below min_freq=2, so not in the vocabulary
    assert tr.vocab[:2] == ["<pad>", "<unk>"] and "w3" not in tr.vocab and "film" in tr.vocab
    assert tr.meta.vocab_size == len(tr.vocab) == 2 + 5  # film great fun dull boring
    assert va.vocab == tr.vocab  # one vocabulary for all splits
    words = lambda row: [va.vocab[i] for i in row.tolist()]  # noqa: E731
    assert words(va.x[0]) == ["great", "fun", "<unk>", "<pad>", "<pad>", "<pad>"]  # "!" is unseen in train
    assert words(va.x[1])[:3] == ["dull", "<unk>", "<unk>"]
    assert te.x.tolist() == [[tr.vocab.index("fun")] * 3]  # truncated to max_len
    assert int(tr.x[0, 3]) == 1 and int(tr.x[0, 4]) == 0  # unknown w0, then padding
    small = data.load("sst2", "train", data_dir=d, max_size=4)
    assert small.meta.vocab_size == 4 and small.vocab[2] == "film"  # most frequent first
    with pytest.raises(TypeError, match="no option"):
        data.load("sst2", "train", data_dir=d, T=3)


def test_tokenizer():
    from minaction.data.text import tokenize

    assert tokenize("It's a GREAT film, isn't it?") == ["it's", "a", "great", "film", ",", "isn't", "it", "?"]
    assert tokenize("you 've got n't") == ["you", "'ve", "got", "n't"]


def test_20newsgroups_carves_val(monkeypatch, tmp_path):
    head = "Category\tText\nd\tstring\nclass\t\n"
    tr = head + "".join(f"{['sci.space', 'alt.atheism'][i % 2]}\tdoc {i} {'rocket' if i % 2 == 0 else 'god'}\n"
                        for i in range(30))
    te = head + "sci.space\trocket launch\nalt.atheism\tgod\n"
    _install(monkeypatch, "20newsgroups", {"train": ("20newsgroups-train.tab", tr.encode()),
                                           "test": ("20newsgroups-test.tab", te.encode())},
             decoders._decode_20ng, tmp_path / "d")
    d = tmp_path / "d"
    a, b, c = (data.load("20newsgroups", s, data_dir=d) for s in ("train", "val", "test"))
    assert (len(a), len(b), len(c)) == (27, 3, 2) and a.meta.num_classes == 2
    assert a.meta.extra["classes"] == ("alt.atheism", "sci.space") and c.y.tolist() == [1, 0]
    assert a.x.shape == (27, 256)


def _nmnist_fixture(monkeypatch, tmp_path):
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    recs = {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, blob):
            info = tarfile.TarInfo(f"NMNISTsmall/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for listing, ids in (("train1K.txt", range(1, 21)), ("test100.txt", range(60001, 60006))):
            add(listing, ("#sample #class\r\n" + "".join(f"{i}\t{i % 10}\r\n" for i in ids)).encode())
            for i in ids:
                n = int(rng.integers(5, 40))
                ev = (rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n),
                      np.sort(rng.integers(0, 300_000, n)))
                recs[i] = ev
                add(f"{i}.bs2", formats.nmnist_event_bytes(*ev))
    _install(monkeypatch, "nmnist", {"tarball": ("nmnist-small.tar.gz", buf.getvalue())},
             decoders._decode_nmnist_tar, tmp_path / "d")
    return recs


def test_nmnist_binning(monkeypatch, tmp_path):
    recs = _nmnist_fixture(monkeypatch, tmp_path)
    d = tmp_path / "d"
    te = data.load("nmnist", "test", data_dir=d, T=4)
    assert te.x.shape == (5, 4, 2, 34, 34) and te.meta.input_shape == (4, 2, 34, 34)
    assert te.y.tolist() == [1, 2, 3, 4, 5] and te.sample_ids.tolist() == list(range(60001, 60006))
    for row, i in enumerate(range(60001, 60006)):
        x, y, p, t = recs[i]
        assert float(te.x[row].sum()) == len(x)
        want = np.zeros((4, 2, 34, 34))
        np.add.at(want, (np.minimum(t * 4 // (t.max() + 1), 3), p, y, x), 1)
        np.testing.assert_array_equal(te.x[row].numpy(), want)
    tr, va = data.load("nmnist", "train", data_dir=d), data.load("nmnist", "val", data_dir=d)
    assert len(tr) + len(va) == 20 and tr.x.shape[1:] == (8, 2, 34, 34)
    assert not set(tr.sample_ids.tolist()) & set(va.sample_ids.tolist())
    sub = tr.subset(5, seed=2)
    pos = [tr.sample_ids.tolist().index(i) for i in sub.sample_ids.tolist()]
    assert torch.equal(sub.x, tr.x[pos]) and torch.equal(sub.y, tr.y[pos])


def test_nmnist_fold_time_keeps_the_bins_apart(monkeypatch, tmp_path):
    _nmnist_fixture(monkeypatch, tmp_path)
    d = tmp_path / "d"
    bins = data.load("nmnist", "test", data_dir=d, T=3)
    folded = data.load("nmnist", "test", data_dir=d, T=3, fold_time=True)
    assert folded.x.shape == (5, 1, 6, 34, 34) and folded.meta.input_shape == (1, 6, 34, 34)
    assert folded.meta.extra["fold_time"] is True and bins.meta.extra["fold_time"] is False
    for b in range(3):
        for p in range(2):  # channel 2 * bin + polarity
            assert torch.equal(folded.x[:, 0, 2 * b + p], bins.x[:, b, p])
    # the stems average over the time axis: folded, the bins reach the model as separate features
    from minaction import models

    net = models.build("mlp", folded.meta)
    assert net.stem.out_features == 6 * 34 * 34 and net(folded.x).shape == (5, 10)
    assert models.build("mlp", bins.meta).stem.out_features == 2 * 34 * 34
    with pytest.raises(TypeError, match="fold_time"):
        data.load("nmnist", "test", data_dir=d, fold_time="yes")


def test_ucr_standardised_with_train_stats(monkeypatch, tmp_path):
    rng = np.random.default_rng(6)

    def tsv(n):
        lab = rng.integers(1, 4, n)
        x = rng.normal(3.0, 2.0, (n, 16))
        return "".join("\t".join([str(l)] + [f"{v:.6f}" for v in row]) + "\n" for l, row in zip(lab, x)).encode()

    _install(monkeypatch, "ecg5000", {"train": ("ECG5000_TRAIN.tsv", tsv(60)), "test": ("ECG5000_TEST.tsv", tsv(30))},
             decoders._decode_ucr, tmp_path / "d")
    d = tmp_path / "d"
    tr, te = data.load("ecg5000", "train", data_dir=d), data.load("ecg5000", "test", data_dir=d)
    assert tr.x.shape[1:] == (1, 16) and tr.meta.input_shape == (1, 16) and tr.meta.num_classes == 3
    assert abs(float(tr.x.mean())) < 1e-5 and abs(float(tr.x.std(unbiased=False)) - 1) < 1e-4
    m, s = tr.meta.extra["train_mean"], tr.meta.extra["train_std"]
    assert abs(m - 3.0) < 0.3 and abs(s - 2.0) < 0.3
    assert set(te.y.tolist()) <= {0, 1, 2}
    raw = data.load("ecg5000", "test", data_dir=d, standardize=False)
    torch.testing.assert_close(te.x, (raw.x - m) / s)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "training")
    with pytest.raises(ValueError, match="modality"):
        data.DataMeta("x", "audio", 2, (1,), torch.float32)


def test_cli_list_and_fetch(monkeypatch, tmp_path, capsys):
    from minaction.data import cli

    _vision_fixture(monkeypatch, tmp_path)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "ecg5000" in out and "sst2" in out
    assert cli.main(["fetch", "--data-dir", str(tmp_path / "d"), "-q", "mnist"]) == 0
    assert "mnist: ok" in capsys.readouterr().out
    assert cli.main(["fetch", "nonesuch"]) == 2
    assert [r["cached"] for r in data.list_datasets() if r["name"] == "mnist"] == [True]


def test_tree_source_per_file_download_and_extracted_folder(tmp_path):
    from minaction.data.sources import TreeSource, tree_digest

    up = tmp_path / "upstream" / "NMNISTsmall"
    up.mkdir(parents=True)
    members = {"a.bs2": formats.nmnist_event_bytes([1], [2], [0], [5]), "list.txt": b"#sample #class\n1\t3\n"}
    for n, b in members.items():
        (up / n).write_bytes(b)
    spec = FileSpec("tree", ["NMNISTsmall"], tree_digest(members))
    remote = TreeSource(names=list(members), base_url=up.as_uri() + "/", cache_folder="t")
    assert remote.fetch([spec])["tree"] == members
    local = TreeSource(names=list(members), folder_name="NMNISTsmall", data_dir=tmp_path / "upstream")
    assert local.fetch([spec])["tree"] == members
    (up / "a.bs2").write_bytes(b"\x00" * 5)
    with pytest.raises(data.ChecksumError, match="tree digest"):
        local.fetch([spec])
    with pytest.raises(sources.SourceUnavailable, match="no folder"):
        TreeSource(names=list(members), folder_name="NMNISTsmall", data_dir=tmp_path).fetch([spec])


def test_tree_source_draws_no_bar_before_its_first_file(monkeypatch, tmp_path, capsys):
    """Offline, the first download fails: no empty '0/N' progress bar before the error."""
    from minaction.data.sources import TreeSource, tree_digest

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))
    members = {f"f{i}.bin": bytes([i]) for i in range(3)}
    spec = FileSpec("tree", ["T"], tree_digest(members))

    def offline(url, dest, progress=True, timeout=60.0):
        raise sources.SourceUnavailable(f"cannot reach {url}")

    monkeypatch.setattr(sources, "download", offline)
    with pytest.raises(sources.SourceUnavailable, match="cannot reach"):
        TreeSource(names=list(members), base_url="https://example.invalid/", cache_folder="t").fetch([spec], progress=True)
    assert "0/3" not in capsys.readouterr().err

    def fake(url, dest, progress=True, timeout=60.0):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(members[url.rsplit("/", 1)[1]])
        return dest

    monkeypatch.setattr(sources, "download", fake)
    got = TreeSource(names=list(members), base_url="https://example.invalid/", cache_folder="t").fetch([spec], progress=True)
    assert got["tree"] == members and "3/3" in capsys.readouterr().err


def test_unwritable_cache_still_loads(monkeypatch, tmp_path):
    _vision_fixture(monkeypatch, tmp_path)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("MINACTION_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    with pytest.warns(RuntimeWarning, match="kept in memory"):
        ds = data.load("mnist", "test", data_dir=tmp_path / "d")
    assert len(ds) == 50


def _fetch_in_child(d):
    data.fetch("mnist", data_dir=d, progress=False)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_parallel_processes_decode_once(monkeypatch, tmp_path):
    import multiprocessing as mp

    _vision_fixture(monkeypatch, tmp_path)
    fam = catalogue.FAMILIES["mnist"]
    log = tmp_path / "decodes.log"

    def counting_decode(files):
        with open(log, "a") as f:
            f.write("x\n")
        import time

        time.sleep(0.3)  # hold the lock long enough for the other process to wait on it
        return decoders._decode_idx4(files)

    counting_decode.__name__ = "_decode_idx4"  # same cache key as the plain decoder
    cand = fam.candidates[0]
    monkeypatch.setitem(catalogue.FAMILIES, "mnist",
                        Family("mnist", [Candidate(cand.source, cand.specs, counting_decode)]))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_fetch_in_child, args=(tmp_path / "d",)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("x") == 1


# ----------------------------------------------------------------------------- register_dataset
def test_register_dataset_loads_through_data_load(monkeypatch):
    monkeypatch.setattr(catalogue, "REGISTERED", {})
    from minaction.data import splits

    monkeypatch.setattr(splits, "REGISTERED", catalogue.REGISTERED)
    calls = []

    def fake(name, split, data_dir=None, seed=0, n=4):
        calls.append((name, split, data_dir, seed, n))
        meta = data.DataMeta(name, "vision", 2, (1, 2, 2), torch.float32)
        return data.Dataset(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.int64), meta, split)

    data.register_dataset("fake", fake)
    ds = data.load("fake", "val", seed=3, n=5)
    assert len(ds) == 5 and calls == [("fake", "val", None, 3, 5)]
    assert catalogue.REGISTERED["fake"].module == __name__
    with pytest.raises(ValueError, match="split must be one of"):
        data.load("fake", "dev")
    with pytest.raises(ValueError, match="built-in dataset"):
        data.register_dataset("mnist", fake)
    with pytest.raises(ValueError, match="non-empty string"):
        data.register_dataset(None, fake)
    with pytest.raises(TypeError, match="load must be callable"):
        data.register_dataset("x", 42)


def test_registered_datasets_are_listed_and_fetched(monkeypatch, capsys):
    monkeypatch.setattr(catalogue, "REGISTERED", {})
    from minaction.data import cli as data_cli
    from minaction.data import splits

    monkeypatch.setattr(splits, "REGISTERED", catalogue.REGISTERED)
    seen = []

    def fake(name, split, data_dir=None, seed=0):
        seen.append(split)
        meta = data.DataMeta(name, "vision", 2, (1, 2, 2), torch.float32)
        return data.Dataset(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64), meta, split)

    data.register_dataset("fake_listed", fake)
    rows = {r["name"]: r for r in data.list_datasets()}
    assert rows["fake_listed"]["registered"] and not rows["mnist"]["registered"]
    assert __name__ in rows["fake_listed"]["description"]
    out = data.fetch("fake_listed")
    assert seen == ["train", "val", "test"] and __name__ in out["fake_listed"]
    with pytest.raises(ValueError, match="fake_listed"):  # the known names include the registered one
        data.fetch("no_such_set")
    assert data_cli._list(type("A", (), {"verbose": True})()) == 0
    assert "fake_listed" in capsys.readouterr().out


def test_spikes_from_the_cpu_kernels_equal_torch_rand(monkeypatch):
    """With the C++ kernels loaded, SpikeDataset draws its spikes with minaction::rate_spikes: the
    same numbers as torch.rand from a CPU generator with the batch's seed (MT19937 on the seed's low
    32 bits), bit for bit, for every seed, shape and max_prob; without them, torch.rand itself."""
    from minaction.backends import cpu, select
    from minaction.data.core import DataMeta, SpikeDataset

    if not select.available("cpu", "cpu")[0]:
        pytest.skip("the cpu backend does not build here")
    cpu.load()
    g = torch.Generator().manual_seed(0)
    for shape, T, max_prob in (((33, 1, 28, 28), 8, 1.0), ((5, 2, 3), 3, 0.7), ((1, 1), 1, 1.0)):
        x = torch.rand(shape, generator=g)
        x.view(-1)[0] = float("nan")  # never fires (u < NaN is false), as in torch
        meta = DataMeta("s", "neuromorphic", 10, (T,) + shape[1:], torch.float32, spike_encoded=True,
                        extra={"max_prob": max_prob})
        ds = SpikeDataset(x, torch.zeros(len(x), dtype=torch.int64), meta, "train")
        for seed, b in ((0, 0), (7, 3), (2**31 + 5, 11)):
            fast = ds.encode(x, seed=seed, batch_index=b)
            with monkeypatch.context() as m:
                m.setattr(cpu, "OPS", None)  # as before the kernels are loaded: torch.rand
                slow = ds.encode(x, seed=seed, batch_index=b)
            assert fast.shape == (shape[0], T) + shape[1:] and fast.dtype == torch.float32
            assert torch.equal(fast, slow), (shape, seed, b)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.minaction.rate_spikes(torch.rand(2, 3, dtype=torch.float64), 1, 2)


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((4, 1, 2, 2), np.float32), torch.zeros(4, dtype=torch.int64), r"x must be a torch.Tensor, got numpy"),
    (torch.zeros(4, 1, 2, 2), np.zeros(4, np.int64), r"y must be a torch.Tensor, got numpy"),
    (torch.zeros(4, 1, 2, 2), torch.zeros(4), r"y must be int64 class labels of shape \[N\], got torch.float32"),
    (torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 1]), r"labels must lie in \[0, 2\).*got 0 \.\. 2"),
    (torch.zeros(4, 1, 2, 2), torch.tensor([0, -1, 1, 1]), r"labels must lie in \[0, 2\)"),
    (torch.zeros(4, 4), torch.zeros(4, dtype=torch.int64), r"samples of shape \(4,\) but its meta.input_shape is "
                                                         r"\(1, 2, 2\)"),
    (torch.zeros(4, 1, 2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.int64),
     r"x has dtype torch.float64 but its meta.input_dtype is torch.float32"),
])
def test_a_dataset_refuses_what_would_fail_every_run(x, y, match):
    """A registered dataset whose load() returned numpy arrays, float labels or labels outside [0, C) was
    accepted, and every run of the study then failed with torch's own error (index_select on an ndarray,
    'Target 3 is out of bounds'); the Dataset names the contract instead."""
    meta = data.DataMeta("mine", "vision", 2, (1, 2, 2), torch.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        data.Dataset(x, y, meta, "train")
    assert len(data.Dataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]), meta, "train")) == 4
    spikes = data.DataMeta("mine", "neuromorphic", 2, (5, 1, 2, 2), torch.float32, spike_encoded=True)
    assert len(data.SpikeDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]), spikes, "train")) == 4


def test_a_truncated_or_garbled_gzip_is_a_checksum_error_naming_the_file():
    """verify() let gzip's EOFError / BadGzipFile through (no file name, not a DataError), so a truncated
    download in the cache was never deleted and fetched again."""
    import os

    spec = sources.FileSpec("train_images", ["train-images-idx3-ubyte.gz"], "0" * 64, content_hash=True)
    for data in (gzip.compress(os.urandom(20000))[:3000], b"\x1f\x8b", gzip.compress(b"abc")[:-3] + b"zzz"):
        with pytest.raises(sources.ChecksumError, match=r"train_images at /x/f.gz is not a whole gzip file"):
            sources.verify(data, spec, "/x/f.gz")


def test_a_url_download_works_with_an_unwritable_cache(tmp_path, monkeypatch):
    """A cache folder that cannot be written (read-only, or a file in the way) raised a bare OSError from
    the download source; the file is now downloaded into a temporary folder and read from there."""
    payload = b"some bytes of a dataset file"
    src_file = tmp_path / "upstream.bin"
    src_file.write_bytes(payload)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setattr(sources, "cache_dir", lambda: blocker / "minaction")
    spec = sources.FileSpec("f", ["upstream.bin"], hashlib.sha256(payload).hexdigest())
    got = sources.UrlSource(urls={"f": src_file.as_uri()}, folder="t").fetch([spec], progress=False)
    assert got == {"f": payload}


def test_option_values_have_their_defaults_types():
    """T=2.7 became 2, standardize="False" standardised, seed=1.5 was recorded as given, val_fraction="0.1" failed
    inside with a comparison error, and sst2 ignored a val_fraction. Checked before any file is read."""
    cases = [("mnist_spikes", dict(T=2.7), TypeError, "option T must be an integer, got 2.7"),
             ("ecg200", dict(standardize="False"), TypeError, "option standardize must be True or False"),
             ("ecg200", dict(val_fraction="0.1"), TypeError, "option val_fraction must be a number"),
             ("nmnist", dict(fold_time=1), TypeError, "option fold_time must be True or False"),
             ("sst2", dict(val_fraction=0.2), ValueError, "val_fraction must stay None"),
             ("mnist", dict(seed=1.5), TypeError, "seed must be an integer, got 1.5"),
             # values the builders refuse, refused with the types (the study checks them before it runs: T = -1
             # failed every run of a study in its worker; a guarantees trial)
             ("nmnist", dict(T=-1), ValueError, "option T must be >= 1, got -1"),
             ("mnist_spikes", dict(max_prob=0.0), ValueError, r"option max_prob must be in \(0, 1\]"),
             ("mnist", dict(val_fraction=1.0), ValueError, r"option val_fraction must be in \[0, 1\)"),
             ("sst2", dict(max_len=0), ValueError, "option max_len must be >= 1")]
    for name, opts, exc, match in cases:
        with pytest.raises(exc, match=match):
            data.load(name, "train", **opts)


def test_a_split_left_empty_by_val_fraction_is_an_error():
    from minaction.data.splits import _nonempty

    with pytest.raises(ValueError, match="leaves no training samples"):
        _nonempty(np.array([], dtype=np.int64), np.arange(5), "train", 0.995)
    with pytest.raises(ValueError, match="val_fraction=0.001 of 90 training samples rounds to none"):
        _nonempty(np.arange(90), np.array([], dtype=np.int64), "val", 0.001)
    _nonempty(np.arange(90), np.arange(10), "train", 0.1)


def test_a_registered_loader_must_return_a_dataset():
    data.register_dataset("returns_tuple", lambda name, split, data_dir=None, seed=0: (1, 2))
    try:
        with pytest.raises(TypeError, match="returned a tuple, not a minaction.data.Dataset"):
            data.load("returns_tuple", "train")
    finally:
        catalogue.REGISTERED.pop("returns_tuple", None)


def test_a_data_dir_that_is_no_folder_is_an_error(tmp_path, capsys):
    """load, fetch and `data fetch` alike (fetch succeeded from the decoded cache with a mistyped folder)."""
    with pytest.raises(FileNotFoundError, match="data_dir .*typo.* is not a folder"):
        data.load("ecg200", "train", data_dir=tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="data_dir .*typo.* is not a folder"):
        data.fetch("ecg200", data_dir=tmp_path / "typo")
    from minaction.cli import main

    assert main(["data", "fetch", "ecg200", "--data-dir", str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.startswith("minaction data fetch: error: --data-dir")
    assert main(["data", "fetch", "nope"]) == 2
    assert capsys.readouterr().err.startswith("minaction data fetch: error: unknown dataset(s): nope")


def test_batch_and_subset_sizes_must_be_integers():
    """int() truncated batches(2.5) to 2 and read batches('32') as 32."""
    ds = data.Dataset(torch.randn(10, 3), torch.randint(0, 2, (10,)),
                      data.DataMeta("t", "physiological", 2, (3,), torch.float32), "train")
    for bad in (2.5, "32", True):
        with pytest.raises(TypeError, match="batch_size must be an integer"):
            next(ds.batches(bad))
        with pytest.raises(TypeError, match="subset size must be an integer"):
            ds.subset(bad)
    assert [len(y) for _, y in ds.batches(np.int64(4), shuffle=False)] == [4, 4, 2] and len(ds.subset(np.int64(3))) == 3


def test_bad_names_and_seeds_are_named_before_any_file_is_read():
    with pytest.raises(TypeError, match=r"separate strings \(fetch\('mnist', 'sst2'\)\), got list"):
        data.fetch(["ecg200"])
    for name in ("ecg200", "mnist"):  # (ecg200 failed in numpy after reading its files; mnist took it)
        with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
            data.load(name, "train", seed=-1)


def test_decoded_cache_write_removes_files_of_killed_writers(tmp_path):
    """A decode killed mid-write left `<file>.<pid>.tmp` (8-17 MB) in the cache for good; the next write of that
    file removes those of writers that are gone, and leaves a running writer's alone."""
    import os
    import subprocess

    import numpy as np

    from minaction.data import cache

    p = subprocess.Popen(["true"])
    p.wait()  # a pid that has exited
    path = tmp_path / "decoded" / "x.npz"
    path.parent.mkdir()
    dead = path.with_name(f"{path.name}.{p.pid}.tmp")
    live = path.with_name(f"{path.name}.{os.getppid()}.tmp")
    dead.write_bytes(b"half")
    live.write_bytes(b"in progress")
    cache._write_cache(path, {"a": np.arange(3)})
    assert path.is_file() and not dead.exists() and live.exists()

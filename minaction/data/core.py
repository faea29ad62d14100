"""The dataset object handed to models and the study: :class:`DataMeta`, :class:`Dataset`
and :class:`SpikeDataset` (rate-coded spikes generated per batch)."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

#: The study's four modalities (one definition: models and the report import it from here).
MODALITIES = ("vision", "text", "neuromorphic", "physiological")


@dataclass(frozen=True)
class DataMeta:
    """What a model needs to know about a dataset.

    ``input_shape`` is the per-sample shape in the model layout (what ``batches`` yields
    after the batch dimension); ``input_dtype`` the torch dtype of those inputs;
    ``vocab_size`` (text only) counts every id including 0 (padding) and 1 (unknown);
    ``spike_encoded`` marks inputs generated from static images (not a recording);
    ``extra`` holds dataset-specific facts (sources, options, statistics).
    """

    name: str
    modality: str
    num_classes: int
    input_shape: Tuple[int, ...]
    input_dtype: torch.dtype
    vocab_size: Optional[int] = None
    spike_encoded: bool = False
    extra: Dict[str, Any] = field(default_factory=dict, hash=False)  # compared, but not hashed

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"dataset {self.name!r}: modality must be one of {MODALITIES}, got {self.modality!r}")


class Dataset:
    """One split of a dataset: tensors ``x`` (inputs) and ``y`` (int64 labels ``[N]``).

    ``batches`` iterates in the model layout; ``subset`` draws a seeded random subset;
    ``to(device)`` moves the tensors (batches are then cut on that device).
    """

    _x_is_input = True  # x holds the model's inputs as they are (a SpikeDataset's are generated from it)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, meta: DataMeta, split: str, vocab=None):
        # the contract a registered dataset's load() must meet, checked here rather than as a failed run per
        # (architecture, seed) later (numpy arrays, float labels, labels outside [0, C))
        for what, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"dataset {meta.name!r} ({split}): {what} must be a torch.Tensor, got "
                                f"{type(t).__module__}.{type(t).__name__} (torch.from_numpy / torch.as_tensor)")
        if y.dtype != torch.int64 or y.dim() != 1:
            raise ValueError(f"dataset {meta.name!r} ({split}): y must be int64 class labels of shape [N], got "
                             f"{y.dtype} of shape {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= meta.num_classes):
            raise ValueError(f"dataset {meta.name!r} ({split}): labels must lie in [0, {meta.num_classes}) "
                             f"(num_classes = {meta.num_classes}), got {int(y.min())} .. {int(y.max())}")
        if len(x) != len(y):
            raise ValueError(f"dataset {meta.name!r} ({split}): x has {len(x)} samples but y has {len(y)}")
        if self._x_is_input:  # x is what batches yield: its sample shape and dtype are the meta's
            if tuple(x.shape[1:]) != tuple(meta.input_shape):
                raise ValueError(f"dataset {meta.name!r} ({split}): x has samples of shape {tuple(x.shape[1:])} but "
                                 f"its meta.input_shape is {tuple(meta.input_shape)} (x is [N, *input_shape])")
            if x.dtype != meta.input_dtype:
                raise TypeError(f"dataset {meta.name!r} ({split}): x has dtype {x.dtype} but its meta.input_dtype "
                                f"is {meta.input_dtype}")
        self.x, self.y, self.meta, self.split = x, y, meta, split
        self.vocab = vocab  # text: list of tokens, index = id
        self.sample_ids: Optional[torch.Tensor] = None  # per-sample source ids where known (nmnist)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def modality(self) -> str:
        return self.meta.modality

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Per-sample input shape in the model layout (what ``batches`` yields per sample)."""
        return tuple(self.meta.input_shape)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.meta.name!r}, split={self.split!r}, n={len(self)}, "
                f"input_shape={tuple(self.meta.input_shape)}, num_classes={self.meta.num_classes})")

    def _like(self, x, y, idx=None):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.x, new.y = x, y
        if idx is not None and self.sample_ids is not None:
            new.sample_ids = self.sample_ids.index_select(0, idx.to(self.sample_ids.device))
        return new

    def to(self, device) -> "Dataset":
        """A copy whose tensors live on ``device``."""
        return self._like(self.x.to(device), self.y.to(device))

    @property
    def encodes(self) -> bool:
        """False where :meth:`encode` is the identity (stored rows are model inputs), so a consumer
        may gather the rows of several index sets in one copy instead of encoding each set; True
        for any subclass that overrides :meth:`encode`."""
        return type(self).encode is not Dataset.encode

    def encode(self, x: torch.Tensor, seed: int = 0, batch_index: int = 0) -> torch.Tensor:
        """Map stored inputs to the model layout (identity here; spikes for ``SpikeDataset``)."""
        return x

    def __getitem__(self, idx):
        """``(x, y)`` for an int, slice or index tensor (inputs encoded with seed 0)."""
        if isinstance(idx, int):
            xb, yb = self.encode(self.x[idx:idx + 1]), self.y[idx]
            return xb[0], yb
        return self.encode(self.x[idx]), self.y[idx]

    # ------------------------------------------------------------------ iteration
    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x [B, *input_shape], y [B])``.

        Shuffling is a ``torch.randperm`` seeded by ``seed`` (the same order for the same
        seed); without it, batches are contiguous views (no copy). Spike datasets draw the
        spikes of batch ``i`` from a generator seeded by ``(seed, i)``.
        """
        batch_size, n = as_int("batch_size", batch_size), len(self)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = n - n % batch_size if drop_last else n
        if shuffle:
            g = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(n, generator=g).to(self.x.device)
        for b, start in enumerate(range(0, stop, batch_size)):
            end = min(start + batch_size, stop)
            if shuffle:
                idx = order[start:end]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            else:
                xb, yb = self.x[start:end], self.y[start:end]
            yield self.encode(xb, seed=seed, batch_index=b), yb

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def time_steps(self) -> int:
        """T of a neuromorphic ``(T, C, H, W)`` input (its time axis), else 1."""
        shape = tuple(self.meta.input_shape)
        return int(shape[0]) if self.meta.modality == "neuromorphic" and len(shape) == 4 else 1

    def time_averaged(self) -> "Dataset":
        """The same split with each sample averaged over its time axis, the axis kept with length 1:
        its batches are exactly ``x.mean(1, keepdim=True)`` of this split's batches (the same spikes,
        for a spike dataset), at a fraction of the memory traffic. For a model that reads its input
        only through that mean (the MLP family's stems: ``reads_time_mean``). Itself where there is
        no time axis (or T = 1)."""
        T = self.time_steps()
        if T <= 1:
            return self
        new = self._like(self.x.mean(dim=1, keepdim=True), self.y)
        new.meta = _averaged_meta(self.meta, T)
        return new

    def subset(self, n: int, seed: int = 0) -> "Dataset":
        """``n`` samples drawn without replacement by a generator seeded by ``seed`` (kept in
        their original order); ``n >= len(self)`` returns the whole split."""
        n = as_int("subset size", n)
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=g)[: int(n)].sort().values.to(self.x.device)
        return self._like(self.x.index_select(0, idx), self.y.index_select(0, idx), idx)


class SpikeDataset(Dataset):
    """Rate-coded spike trains generated on the fly from images in ``[0, 1]``.

    ``x`` holds the images ``[N, 1, 28, 28]``; ``batches`` yields ``[B, T, 1, 28, 28]`` float32
    spikes in {0, 1}: pixel ``v`` fires at each of the ``T`` steps independently with
    probability ``max_prob * v``. Nothing is materialised; batch ``i`` is seeded by ``(seed, i)``.
    """

    _steps = None  # T of a time-averaged copy (its meta says 1); None: meta.input_shape[0]
    _x_is_input = False  # x: images [N, *input_shape[1:]], drawn as T frames per batch

    def time_steps(self) -> int:
        return int(self._steps or self.meta.input_shape[0])

    def time_averaged(self) -> "SpikeDataset":
        """The spikes' time mean, ``[B, 1, 1, 28, 28]`` per batch, drawn from the same numbers as
        :meth:`batches` (the C++ kernels count them without writing the T frames)."""
        T = self.time_steps()
        if T <= 1 or self._steps is not None:
            return self
        new = self._like(self.x, self.y)
        new._steps, new.meta = T, _averaged_meta(self.meta, T)
        return new

    def encode(self, x, seed: int = 0, batch_index: int = 0):
        T = self.time_steps()
        max_prob = float(self.meta.extra.get("max_prob", 1.0))
        state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch_index)]).generate_state(2)
        seed64 = int(state[0]) << 32 | int(state[1])
        p = x if max_prob == 1.0 else x * max_prob
        ops = _loaded_cpu_ops() if x.device.type == "cpu" and p.dtype == torch.float32 else None
        if ops is not None:
            # the same numbers as below (torch's CPU generator keeps the seed's low 32 bits), drawn ~5x faster:
            # torch.rand's per-element serial kernel was half of an MLP step on the spike datasets
            if self._steps is not None:  # their time mean: counts / T, as torch's mean divides a sum
                return ops.rate_spike_counts(p, seed64 & 0xFFFFFFFF, T).div_(T)
            return ops.rate_spikes(p, seed64 & 0xFFFFFFFF, T)
        g = torch.Generator(device=x.device).manual_seed(seed64)
        u = torch.rand((x.shape[0], T, *x.shape[1:]), generator=g, device=x.device, dtype=torch.float32)
        s = u.lt_(p.unsqueeze(1))  # in place: 1.0 where u < p, else 0.0 (no bool temporary)
        return s.mean(dim=1, keepdim=True) if self._steps is not None else s


def _averaged_meta(meta: DataMeta, T: int) -> DataMeta:
    return dataclasses.replace(meta, input_shape=(1,) + tuple(meta.input_shape[1:]),
                               extra={**meta.extra, "time_averaged_over": int(T)})


def _loaded_cpu_ops():
    """``torch.ops.minaction`` when the C++ kernels are already loaded in this process (the study's
    workers load them with the first model), else None: reading data never starts a build."""
    from ..backends import cpu

    return cpu.OPS


def as_int(what: str, v) -> int:
    """``v`` as an int, or TypeError naming ``what``: an integral number only (numpy and 0-dim integer
    tensors too), never a float, a string or a bool, which ``int()`` truncated or read silently
    (batches(2.5) ran batches of 2; models.build(num_models=2.5) built 2 members)."""
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an integer, got {v!r}")


def carve_val(y: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into (train, val), stratified by label.

    Val holds ``round(fraction * N)`` samples, shared among the classes in proportion to their
    size (largest remainder), each class's chosen by a permutation seeded by ``seed``.
    Both index arrays are sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    y = np.asarray(y)
    perm = np.random.default_rng(int(seed)).permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    # largest-remainder apportionment: round(fraction * N) in all, each class close to its share
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    short = int(round(fraction * len(y))) - int(take.sum())
    if short > 0:
        take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    val = []
    for c, k in zip(classes, take):
        members = perm[y[perm] == c]
        val.append(members[:k])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def replace_meta(meta: DataMeta, **kw) -> DataMeta:
    return dataclasses.replace(meta, **kw)

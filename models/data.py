"""Task streams: Split-Digits, Permuted-Digits (scikit-learn's bundled digits) and .npz files.

No download ever: the digits (1,797 8x8 images) ship inside scikit-learn. Splits are
stratified and seeded, so the same seed gives the same train/test sets everywhere.
Labels inside a task are local (0..k-1); ``Task.classes`` maps them back to the
stream's labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecl.runtime.errors import EdgeclError
from edgecl.runtime.samples import read_labelled_npz

STREAMS = ("split-digits", "permuted-digits")


class DataError(EdgeclError):
    """A data set that cannot be loaded or split into tasks."""


@dataclass
class Task:
    name: str
    classes: list[int]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Stream:
    """An ordered list of tasks, plus how to make it again (``spec``)."""

    name: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    spec: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def _make_task(name, classes, x, y, tr, te) -> Task:
    lut = {int(c): i for i, c in enumerate(classes)}

    def local(idx: np.ndarray) -> np.ndarray:
        return np.array([lut[int(v)] for v in y[idx]], dtype=np.int64)

    return Task(name, [int(c) for c in classes], x[tr], local(tr), x[te], local(te))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def split_digits(seed: int = 0, test_fraction: float = 0.25) -> Stream:
    """5 tasks of 2 classes: 0/1, 2/3, 4/5, 6/7, 8/9."""
    x, y = _digits()
    tr, te = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    tasks = []
    for a in range(0, 10, 2):
        sel_tr, sel_te = tr[np.isin(y[tr], (a, a + 1))], te[np.isin(y[te], (a, a + 1))]
        tasks.append(_make_task(f"digits-{a}-{a + 1}", [a, a + 1], x, y, sel_tr, sel_te))
    return Stream("split-digits", tasks, (1, 8, 8),
                  {"data": "split-digits", "seed": seed, "test_fraction": test_fraction})


def permute(x: np.ndarray, task: int, seed: int) -> np.ndarray:
    """Task ``task``'s fixed pixel permutation of a batch of digits."""
    perm = np.random.default_rng([seed, task]).permutation(64)
    return x.reshape(len(x), -1)[:, perm].reshape(x.shape)


def permuted_digits(n_tasks: int = 10, seed: int = 0, test_fraction: float = 0.25) -> Stream:
    """``n_tasks`` tasks of all 10 classes, each with its own seeded pixel permutation."""
    if n_tasks < 1:
        raise DataError(f"permuted-digits needs at least one task, got {n_tasks}")
    x, y = _digits()
    tr, te = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    tasks = [_make_task(f"perm-{t}", list(range(10)), permute(x, t, seed), y, tr, te)
             for t in range(n_tasks)]
    return Stream("permuted-digits", tasks, (1, 8, 8),
                  {"data": "permuted-digits", "seed": seed, "n_tasks": n_tasks,
                   "test_fraction": test_fraction})


def load_npz(path: str | Path, seed: int = 0, test_fraction: float = 0.25,
             classes_per_task: int = 2) -> Stream:
    """A user's stream from ``.npz``: arrays ``x`` [N, ...], ``y`` [N], optional ``task`` [N].

    Without ``task`` the sorted classes are cut into tasks of ``classes_per_task``.
    ``x`` of uint8 is scaled to [0, 1]; [N, H, W] images get a channel axis.
    """
    path = Path(path)
    x, y, arrays = read_labelled_npz(path, DataError)
    if x.ndim == 3:
        x = x[:, None]
    if "task" in arrays:
        tid = arrays["task"]
        if tid.shape != y.shape:
            raise DataError(f"{path}: task has shape {tid.shape}, y has {y.shape}")
        groups = [(f"task-{t}", tid == t) for t in np.unique(tid)]
    else:
        cls = np.unique(y)
        groups = [(f"classes-{'-'.join(map(str, chunk))}", np.isin(y, chunk))
                  for chunk in (cls[i : i + classes_per_task]
                                for i in range(0, len(cls), classes_per_task))]
    rng = np.random.default_rng(seed)
    tasks = []
    for name, sel in groups:
        idx = np.flatnonzero(sel)
        tr, te = _stratified_split(y[idx], test_fraction, rng)
        tasks.append(_make_task(name, np.unique(y[idx]).tolist(), x[idx], y[idx], tr, te))
    return Stream(path.stem, tasks, tuple(x.shape[1:]),
                  {"data": str(path), "seed": seed, "test_fraction": test_fraction})


def fit_input(x: np.ndarray, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """Samples made to fit a model's input: reshaped when the sizes agree; images
    resized (bilinear, half-pixel centres, as PyTorch's ``interpolate``) and their
    channels repeated for a larger image model; for a vector model, the flattened sample
    linearly resampled to its length; for a token model (int64 input), each
    pixel becomes a token ``1000 + round(16 * value)``, padded with 0 to its length."""
    shape = tuple(int(s) for s in shape)
    n = len(x)
    if dtype == "int64":
        if len(shape) != 1:
            raise DataError(f"a token model takes [length] inputs, not {shape}")
        flat = np.rint(np.clip(x.reshape(n, -1), 0, 1) * 16).astype(np.int64) + 1000
        out = np.zeros((n, shape[0]), np.int64)
        k = min(shape[0], flat.shape[1])
        out[:, :k] = flat[:, :k]
        return out
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(n, *shape).astype(np.float32, copy=False)
    if len(shape) == 1:  # a vector model (e.g. 640 audio features): the flattened sample, resampled
        flat = x.reshape(n, -1).astype(np.float32)
        pos = np.linspace(0, flat.shape[1] - 1, shape[0])
        return np.stack([np.interp(pos, np.arange(flat.shape[1]), row) for row in flat]).astype(np.float32)
    if x.ndim != 4 or len(shape) != 3:
        raise DataError(f"samples of shape {x.shape[1:]} cannot be fitted to a model input {shape}")
    c, h, w = shape
    if x.shape[1] not in (1, c):
        raise DataError(f"samples have {x.shape[1]} channels, the model takes {c}")

    def interp(size_in: int, size_out: int) -> np.ndarray:
        pos = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, size_in - 1)
        m = np.zeros((size_out, size_in), np.float32)
        m[np.arange(size_out), lo] += 1 - (pos - lo)
        m[np.arange(size_out), hi] += pos - lo
        return m

    y = np.einsum("hi,ncij,wj->nchw", interp(x.shape[2], h), x.astype(np.float32), interp(x.shape[3], w))
    if y.shape[1] != c:
        y = np.repeat(y, c, axis=1)
    return np.ascontiguousarray(y, dtype=np.float32)


def _fitted(stream: Stream, shape: tuple[int, ...], dtype: str) -> Stream:
    for t in stream.tasks:
        t.x_train, t.x_test = fit_input(t.x_train, shape, dtype), fit_input(t.x_test, shape, dtype)
    stream.input_shape = tuple(shape)
    stream.spec = {**stream.spec, "fit": {"shape": list(shape), "dtype": dtype}}
    return stream


def load_stream(data: str, *, seed: int = 0, n_tasks: int | None = None,
                fit: tuple[tuple[int, ...], str] | None = None) -> Stream:
    """``split-digits``, ``permuted-digits`` or a path to an ``.npz`` file; with ``fit``
    (a model's input shape and dtype), samples are made to fit it (``fit_input``)."""
    if data == "split-digits":
        stream = split_digits(seed)
    elif data == "permuted-digits":
        stream = permuted_digits(n_tasks or 10, seed)
    elif data.endswith(".npz"):
        stream = load_npz(data, seed)
    else:
        raise DataError(f"unknown data {data!r}: use {', '.join(STREAMS)} or a path to an .npz")
    if n_tasks is not None:
        if not 1 <= n_tasks <= len(stream):
            raise DataError(f"{data}: --tasks {n_tasks} is outside 1..{len(stream)}")
        stream.tasks = stream.tasks[:n_tasks]
    if fit is not None and (math.prod(fit[0]) != math.prod(stream.input_shape) or fit[1] != "float32"):
        stream = _fitted(stream, tuple(fit[0]), fit[1])
    return stream


def load_spec(spec: dict, n_tasks: int | None = None) -> Stream:
    """The stream a run or bundle recorded (``Stream.spec``), fitted as it was."""
    fit = spec.get("fit")
    return load_stream(spec["data"], seed=spec.get("seed", 0), n_tasks=n_tasks or spec.get("n_tasks"),
                       fit=None if not fit else (tuple(fit["shape"]), fit["dtype"]))

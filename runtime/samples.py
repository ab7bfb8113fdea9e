"""Reading labelled samples from ``.npz`` (arrays ``x`` [N, ...], ``y`` [N], optional
others): one reader for the host's data streams and the device's learner; and seeded
canary inputs fit for a bundle's model (golden outputs, timing a provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EdgeclError


def read_labelled_npz(path: str | Path, error: type[EdgeclError] = EdgeclError
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(x float32 — uint8 scaled to [0, 1] —, y int64, every array in the file).

    Raises ``error`` naming the file for anything unreadable or inconsistent.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except Exception as e:
        raise error(f"{path}: not a readable .npz file ({e})") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise error(f"{path}: missing array {key!r} (has: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y) or len(x) == 0:
        raise error(f"{path}: x has {len(x)} rows and y has {len(y)}; need the same, > 0")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise error(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(x).all():
        raise error(f"{path}: x holds NaN or infinite values")
    return x, y.astype(np.int64), arrays


def canary(bundle, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A seeded input batch fit for the bundle's model: uniform [0, 1) floats, or token
    ids within its embedding table."""
    g = bundle.graph
    rng = np.random.default_rng(seed)
    if g.input.dtype == "int64":
        vocab = min((p.shape[0] for p in g.params.values() if p.role == "embedding"), default=1024)
        return rng.integers(0, vocab, (batch, *g.input_shape), dtype=np.int64)
    return rng.random((batch, *g.input_shape), dtype=np.float32)

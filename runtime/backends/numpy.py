"""The reference backend: the numpy executor of ``edgecl.runtime.session``."""

from __future__ import annotations

import numpy as np

from .. import executor
from . import Backend


class NumpyBackend(Backend):
    name = "numpy"
    keeps_weights = False  # it runs on the reference's materialized weights

    def _activate(self, info: dict) -> None:
        self._active = self.materialized(info)

    def _run(self, x: np.ndarray) -> np.ndarray:
        a = self._active
        return executor.forward(self.bundle.graph, a.params, a.head, x)


BACKEND = NumpyBackend

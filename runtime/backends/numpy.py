"""The reference backend: the numpy executor of ``edgecl.runtime.session``."""

from __future__ import annotations

import numpy as np

from .. import executor
from . import Backend


class NumpyBackend(Backend):
    name = "numpy"
    keeps_weights = False  # it runs on the reference's materialized weights
    any_graph = True  # it runs whatever graph the task names

    def _activate(self, info: dict) -> None:
        self._active = self.materialized(info)

    def _run(self, x: np.ndarray) -> np.ndarray:
        a = self._active
        return executor.forward(a.graph, a.params, a.head, x)


BACKEND = NumpyBackend

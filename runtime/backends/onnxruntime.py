"""ONNX Runtime over the bundle's exported graph (``compiler/onnx_export.py``).

The graph's weights are external initializers; activating a task creates a session
with the task's ``W ⊙ M`` and head supplied in memory (``add_external_initializers``),
so ORT constant-folds and pre-packs them once per task switch, not per call.
"""

from __future__ import annotations

import numpy as np

from . import Backend, has_module


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, threads: int = 1, **options) -> None:
        super().__init__(bundle, **options)
        import onnxruntime

        self._ort = onnxruntime
        self.threads = int(threads)
        self._graphs = {int(n): bundle.store.read(rel)
                        for n, rel in bundle.manifest["exports"]["onnx"]["files"].items()}

    @classmethod
    def available(cls, bundle=None) -> str | None:
        if not has_module("onnxruntime"):
            return "the onnxruntime package is not installed"
        if bundle is not None and "onnx" not in bundle.manifest.get("exports", {}):
            return f"the bundle holds no ONNX export (run: edgecl compile {bundle.root} --target host)"
        return None

    def _activate(self, info: dict) -> None:
        ort = self._ort
        classes = len(info["classes"])
        if classes not in self._graphs:
            raise ValueError(f"task {info['name']!r} has {classes} classes; the bundle's ONNX "
                             f"export holds graphs for {sorted(self._graphs)}: export again")
        a = self.materialized(info)
        used = {i for n in self.bundle.graph.backbone_nodes for i in n.inputs}
        names = [p for p in self.bundle.graph.params if p in used]
        values = [np.asarray(a.params[p], dtype=np.float32, order="C") for p in names]  # keeps 0-d
        names += ["head.weight", "head.bias"]
        values += [np.ascontiguousarray(h, dtype=np.float32) for h in a.head]
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        self._keep = [ort.OrtValue.ortvalue_from_numpy(v) for v in values]  # must outlive the session
        so.add_external_initializers(names, self._keep)
        self._session = ort.InferenceSession(self._graphs[classes], so,
                                             providers=["CPUExecutionProvider"])

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"x": x})[0]


BACKEND = OnnxRuntimeBackend

"""TFLite / LiteRT backend over the bundle's TFLite templates (``compiler/tflite_export.py``).

The interpreter is ``ai_edge_litert.interpreter.Interpreter`` (LiteRT, works with NumPy
2.x), else ``tflite_runtime.interpreter.Interpreter`` (tflite-runtime 2.14, needs NumPy
< 2). Activating a task takes its ``ActiveTask.params`` (parameter name -> ``W ⊙ M``)
and head, puts each array in its hole's layout (conv weights to OHWI, depthwise to
1HWO, constants of NHWC elementwise ops to NHWC; see the exporter's docstring) and
writes it into the template's holes — numpy and a byte copy — then builds interpreters
from those bytes, one per batch size in use (at most ``max_batch_sizes``; batch 1 and
the sizes the previous task ran are built at activation, a new size on its first call),
so TFLite treats the weights as constants (XNNPACK packs them once per interpreter).
The template of the task's class count is used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from . import Backend, has_module


def interpreter_class():
    """The first usable ``Interpreter``: ai-edge-litert, then tflite-runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def to_layout(array: np.ndarray, hole: dict) -> np.ndarray:
    """A graph-layout (PyTorch-layout) parameter in the layout a template hole wants."""
    rows = hole.get("rows")
    if rows is not None:  # one group of a grouped convolution
        array = array[rows[0]:rows[1]]
    layout = hole["layout"]
    if layout in ("as-is", "oi", "o"):
        return array
    if layout == "ohwi":  # [O, C, kh, kw] -> [O, kh, kw, C]
        return array.transpose(0, 2, 3, 1)
    if layout == "1hwo":  # depthwise [O, 1, kh, kw] -> [1, kh, kw, O]
        return array.transpose(1, 2, 3, 0)
    if layout == "nhwc":  # an elementwise operand: broadcast rank 4, NCHW -> NHWC
        if array.ndim > 4:
            raise ValueError(f"TFLite template: {hole.get('tensor')}: rank {array.ndim} has no NHWC form")
        return array.reshape((1,) * (4 - array.ndim) + array.shape).transpose(0, 2, 3, 1)
    if layout == "oi-from-chw":  # format-1 templates: input columns (c, h, w) -> (h, w, c)
        c, h, w = hole["chw"]
        o = array.shape[0]
        return array.reshape(o, c, h, w).transpose(0, 2, 3, 1).reshape(o, c * h * w)
    raise ValueError(f"TFLite template: unknown layout {layout!r}")


def hole_tensors(entry: dict, params: Mapping[str, np.ndarray],
                 head: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Hole tensor name -> its contents: the task's parameters (by graph name) and head,
    each in its hole's layout."""
    heads = {"head.weight": head[0], "head.bias": head[1]}
    out = {}
    for h in entry["holes"]:
        name = h.get("param", h["tensor"])  # templates of format 1 name the tensor only
        if h.get("head") or ("param" not in h and name in heads):
            src = heads[name]
        elif name in params:
            src = params[name]
        else:
            raise ValueError(f"TFLite template: hole {h['tensor']!r} wants parameter {name!r}, "
                             "which the task does not have")
        out[h["tensor"]] = to_layout(np.asarray(src, np.float32), h)
    return out


def fill_template(template: bytes, entry: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """The full .tflite model: ``template`` with every hole filled from ``tensors``."""
    out = bytearray(int(entry["bytes"]))
    src = dst = 0
    for h in entry["holes"]:
        n = h["offset"] - dst
        out[dst:h["offset"]] = template[src:src + n]
        src += n
        data = np.ascontiguousarray(tensors[h["tensor"]], dtype="<f4")
        if data.nbytes != h["bytes"]:
            raise ValueError(f"{h['tensor']}: {data.nbytes} bytes, the template's hole holds {h['bytes']}")
        out[h["offset"]:h["offset"] + h["bytes"]] = memoryview(data).cast("B")
        dst = h["offset"] + h["bytes"]
    out[dst:] = template[src:]
    return bytes(out)


class TfliteBackend(Backend):
    name = "tflite"

    def __init__(self, bundle, threads: int = 1, max_batch_sizes: int = 4, **options) -> None:
        super().__init__(bundle, **options)
        self._interpreter = interpreter_class()
        self.threads = int(threads)
        self.max_batch_sizes = int(max_batch_sizes)
        exp = bundle.manifest["exports"]["tflite"]
        self._graphs = {int(n): (entry, bundle.store.read(entry["file"]))
                        for n, entry in exp["graphs"].items()}
        self._content: bytes | None = None
        self._interps: OrderedDict[int, tuple] = OrderedDict()

    @classmethod
    def available(cls, bundle=None) -> str | None:
        if has_module("ai_edge_litert"):
            pass
        elif has_module("tflite_runtime"):
            if int(np.__version__.split(".")[0]) >= 2:
                return ("tflite-runtime is built against NumPy 1.x and this is NumPy "
                        f"{np.__version__}: install ai-edge-litert (or numpy<2)")
        else:
            return "neither ai-edge-litert nor tflite-runtime is installed"
        if bundle is not None:
            exp = bundle.manifest.get("exports", {}).get("tflite")
            if exp is None:
                return f"the bundle holds no TFLite export (run: edgecl compile {bundle.root} --target host)"
            if exp.get("unavailable"):
                return exp["unavailable"]
        return None

    def model_bytes(self, info: dict) -> bytes:
        """The task's complete .tflite model (its weights written into the template)."""
        classes = len(info["classes"])
        if classes not in self._graphs:
            raise ValueError(f"task {info['name']!r} has {classes} classes; the bundle's TFLite "
                             f"export holds templates for {sorted(self._graphs)}: export again")
        entry, template = self._graphs[classes]
        a = self.materialized(info)
        tensors = hole_tensors(entry, a.params, a.head)
        return fill_template(template, entry, tensors)

    def _activate(self, info: dict) -> None:
        sizes = list(self._interps) or [1]
        self._interps.clear()
        self._content = self.model_bytes(info)
        for n in sizes:  # the batch sizes in use get their interpreters now, not on the next call
            self._interp(n)

    def _interp(self, n: int):
        it = self._interps.get(n)
        if it is not None:
            self._interps.move_to_end(n)
            return it
        interp = self._interpreter(model_content=self._content, num_threads=self.threads)
        inp = interp.get_input_details()[0]
        if n != 1:
            interp.resize_tensor_input(inp["index"], [n, *inp["shape"][1:]])
        interp.allocate_tensors()
        it = (interp, inp["index"], interp.get_output_details()[0]["index"], inp["dtype"])
        self._interps[n] = it
        while len(self._interps) > self.max_batch_sizes:
            self._interps.popitem(last=False)
        return it

    def _run(self, x: np.ndarray) -> np.ndarray:
        interp, i, o, dtype = self._interp(len(x))
        interp.set_tensor(i, np.ascontiguousarray(x, dtype=dtype))
        interp.invoke()
        return interp.get_tensor(o)


BACKEND = TfliteBackend

"""``edgecl bench``: edgecl against its peers on one bundle, side by side, in one run.

Every row runs in its own fresh process with one thread (``OMP/OPENBLAS/MKL/TVM_NUM_THREADS=1``,
ONNX Runtime intra/inter-op threads 1, LiteRT ``num_threads=1``, ``torch.set_num_threads(1)``),
on the same inputs (the bundle's canary inputs), so cold load and peak RSS are its own.

edgecl rows (``kind: edgecl``; the timed call is the public one, ``Session.logits(x, task)``,
input validation included; ``p50_backend_s`` is the backend's own ``run_checked``):

- ``edgecl``: ``Session(bundle)`` with its default providers (the first available of tvm,
  onnxruntime, tflite, numpy; ``provider`` says which it picked);
- ``numpy``, ``tvm``, ``onnxruntime``, ``tflite``: ``Session(bundle, providers=[name])``.

Peer rows (``kind: peer``; no edgecl code in their process' timed path):

- ``ort``: a plain ``onnxruntime.InferenceSession`` on the bundle's ONNX graph with the task's
  ``W ⊙ M`` and head baked in as ordinary initializers (one ``.onnx`` file per task);
- ``litert``: a plain ``ai_edge_litert`` (else ``tflite_runtime``) ``Interpreter`` on the
  task's filled ``.tflite``, one interpreter per batch size;
- ``torch``: PyTorch eager on the original zoo ``nn.Module`` (``zoo_module``: BatchNorm
  layers and all, its classifier replaced by the task's head, the task's weights loaded;
  its features first checked against the numpy reference on the unmasked backbone) when
  the bundle came from the zoo; else the graph run through ``edgecl.models.torchnet``.

Per row and batch size: latency p50/p99, throughput, ``x_peer`` (p50 over the fastest peer's
at that batch), cold load (process start to the first task's first output), task switch
(an edgecl row: activate the other task with its ``W ⊙ M`` not cached; ``ort``: a new
session from the other task's file; ``litert``: new interpreters from the other task's
file for the batch sizes in use; ``torch``: ``load_state_dict`` of the other task's
weights read from disk), also per million masked weights, the peak RSS of the process, the
router's time (its own process, one thread) and its share of that row's inference, and
``check``: the row's batch-1 logits against the numpy reference (max |diff| / max |ref|).

    edgecl bench BUNDLE_DIR [--backends edgecl,numpy,tvm,onnxruntime,tflite,ort,litert,torch]
                 [--batch 1,32] [--iters 20000] [--seconds 2] [--json OUT] [--plot OUT.png]
    edgecl bench zoo [--models a,b] [--batch 1,8] [--out docs/bench/zoo.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EDGECL_ROWS = ("edgecl", "numpy", "tvm", "onnxruntime", "tflite")
PEER_ROWS = ("ort", "litert", "torch")
ROWS = EDGECL_ROWS + PEER_ROWS
DEFAULT_BACKENDS = ",".join(ROWS)
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                               "TVM_NUM_THREADS")}
CHILD_TIMEOUT_S = 1800


# -- the child process: one row, printed as one JSON line ----------------------------------
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from edgecl.tools.bench import child_main
child_main(json.loads(open(sys.argv[1]).read()), t0)
"""


def _timed(call, x, batch: int, iters: int, seconds: float, min_n: int) -> dict:
    """p50/p99 of ``call(x)``: ``iters // batch`` calls, at most ``seconds`` worth (at least
    ``min_n``), after a warm-up of up to a fifth of that (at least 3 calls)."""
    warm, end = [], time.perf_counter() + 0.2 * seconds
    while len(warm) < 3 or (time.perf_counter() < end and len(warm) < 1000):
        t = time.perf_counter()
        call(x)
        warm.append(time.perf_counter() - t)
    per = max(float(np.median(warm)), 1e-7)
    n = max(min_n, min(max(1, iters // batch), int(seconds / per)))
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        call(x)
        times[i] = time.perf_counter() - t
    return {"batch": batch, "p50_s": float(np.percentile(times, 50)),
            "p99_s": float(np.percentile(times, 99)),
            "throughput_per_s": batch / float(times.mean()), "iters": n}


class _SessionRow:
    """An edgecl row: ``Session`` with the default providers, or one provider by name."""

    def __init__(self, spec: dict) -> None:
        from edgecl.runtime import Session

        providers = None if spec["row"] == "edgecl" else [spec["row"]]
        self.s = Session(spec["bundle"], providers=providers, threads=1)
        self.tasks = self.s.tasks
        self.task = self.tasks[0]
        self.provider = self.s.provider

    def call(self, x):
        return self.s.logits(x, self.task)

    def backend_call(self, x):
        return self.s.backend.run_checked(x)

    def switch(self, task: int) -> None:
        be = self.s.backend
        be.runtime._cache.clear()  # the real materialization, not the LRU cache
        be.activate(self.tasks[task])


class _OrtRow:
    """A plain ONNX Runtime session on a model file with the task's weights baked in."""

    def __init__(self, spec: dict) -> None:
        import onnxruntime as ort

        self.ort, self.files = ort, spec["files"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.so = so
        self.provider = f"onnxruntime {ort.__version__}"
        self.switch(0)
        self.name = self.sess.get_inputs()[0].name

    def switch(self, task: int) -> None:
        self.sess = self.ort.InferenceSession(self.files[task], self.so, providers=["CPUExecutionProvider"])

    def call(self, x):
        return self.sess.run(None, {self.name: x})[0]


class _LitertRow:
    """A plain LiteRT interpreter per batch size on the task's filled .tflite file."""

    def __init__(self, spec: dict) -> None:
        try:
            import ai_edge_litert as lib
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            import tflite_runtime as lib
            from tflite_runtime.interpreter import Interpreter
        self.Interpreter, self.files = Interpreter, spec["files"]
        self.provider = f"{lib.__name__} {getattr(lib, '__version__', '')}".strip()
        self.interps: dict[int, tuple] = {}
        self.file = self.files[0]

    def _interp(self, n: int) -> tuple:
        it = self.Interpreter(model_path=self.file, num_threads=1)
        inp = it.get_input_details()[0]
        if n != 1:
            it.resize_tensor_input(inp["index"], [n, *inp["shape"][1:]])
        it.allocate_tensors()
        self.interps[n] = (it, inp["index"], it.get_output_details()[0]["index"], inp["dtype"])
        return self.interps[n]

    def switch(self, task: int) -> None:
        self.file = self.files[task]
        for n in list(self.interps) or [1]:  # the batch sizes in use, as edgecl's tflite backend does
            self._interp(n)

    def call(self, x):
        it, i, o, dtype = self.interps.get(len(x)) or self._interp(len(x))
        it.set_tensor(i, x if x.dtype == dtype else x.astype(dtype))  # token ids: int64 -> int32
        it.invoke()
        return it.get_tensor(o)


class _TorchRow:
    """PyTorch eager: the original zoo module, or the graph through torchnet."""

    def __init__(self, spec: dict) -> None:
        import torch

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        from safetensors.torch import load_file

        self.torch, self.load_file, self.files = torch, load_file, spec["files"]
        self._mode = torch.inference_mode()
        self._mode.__enter__()  # for the whole process, as a deployed torch model would run
        zoo = spec["torch"].get("zoo")
        if zoo:
            self.module = zoo_peer_module(zoo["name"], dict(zoo["kwargs"], pretrained=False),
                                          zoo["classes"], zoo["feature_dim"])[0]
            self.provider = f"torch {torch.__version__} eager, zoo module {zoo['name']}"
        else:
            from edgecl.models.torchnet import features
            from edgecl.runtime.bundle import Bundle

            self.graph, self.features = Bundle.open(spec["bundle"], verify=False).graph, features
            self.module = None
            self.provider = f"torch {torch.__version__} eager, graph via torchnet"
        self.switch(0)

    def switch(self, task: int) -> None:
        state = self.load_file(self.files[task])
        if self.module is not None:
            self.module.load_state_dict(state)
        else:
            self.head = (state.pop("head.weight"), state.pop("head.bias"))
            self.params = state

    def call(self, x):
        t = self.torch.from_numpy(x)
        if self.module is not None:
            return self.module(t).numpy()
        h = self.features(self.graph, self.params, t)
        return self.torch.nn.functional.linear(h, *self.head).numpy()


_RUNNERS = {"ort": _OrtRow, "litert": _LitertRow, "torch": _TorchRow}


def router_main(spec: dict, inputs: dict) -> None:
    """The bundle's default router deciding each batch (its own process, one thread)."""
    from edgecl.runtime import Session

    s = Session(spec["bundle"], providers=["numpy"], threads=1)
    if not s.bundle.manifest.get("default_router"):
        print("BENCH " + json.dumps({"router": None}))
        return
    router, rt = s.router, s.backend.runtime
    out = {str(b): _timed(lambda x: router.decide(rt, x), x, b, int(spec["iters"]), float(spec["seconds"]),
                          int(spec["min_iters"]))["p50_s"] for b, x in inputs.items()}
    print("BENCH " + json.dumps({"router": {"name": router.name, "s": out}}))


def peak_rss() -> int:
    """This process' peak RSS (``VmHWM``: ru_maxrss carries the parent's over fork + exec on
    Linux, so a child of a big parent would report the parent's)."""
    from edgecl.runtime.learn.progress import peak_rss_bytes

    return peak_rss_bytes()


def child_main(spec: dict, t0: float) -> None:
    inputs = {int(b): np.load(p) for b, p in spec["inputs"].items()}
    if spec["row"] == "router":
        return router_main(spec, inputs)
    row = _RUNNERS.get(spec["row"], _SessionRow)(spec)
    first = row.call(inputs[1])
    cold = time.perf_counter() - t0
    it, sec, min_n = int(spec["iters"]), float(spec["seconds"]), int(spec["min_iters"])
    rows = []
    for b in spec["batches"]:
        r = _timed(row.call, inputs[b], b, it, sec, min_n)
        if hasattr(row, "backend_call"):  # a shorter second look: the backend alone
            r["p50_backend_s"] = _timed(row.backend_call, inputs[b], b, it, sec / 2, min(min_n, 5))["p50_s"]
        rows.append(r)
    switch = float("nan")
    if spec["n_tasks"] >= 2:
        times = []
        for i in range(int(spec["switch_rounds"])):
            t = time.perf_counter()
            row.switch((i + 1) % 2)
            times.append(time.perf_counter() - t)
        switch = float(np.median(times))
    rss = peak_rss()
    print("BENCH " + json.dumps({"cold_load_s": cold, "rows": rows, "task_switch_s": switch,
                                 "peak_rss_bytes": rss, "provider": row.provider,
                                 "first": np.asarray(first, np.float64).tolist()}))


def run_child(spec: dict, workdir: Path) -> dict:
    """One row in a fresh one-thread process; its JSON, or {"error": why}."""
    path = workdir / f"spec-{spec['row']}.json"
    path.write_text(json.dumps(spec))
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                           timeout=CHILD_TIMEOUT_S, env=dict(os.environ, **ONE_THREAD))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or [f"exit code {r.returncode}"]
        return {"error": err[-1][:300]}
    return json.loads(line[6:])


# -- the parent: what the peers load, prepared with edgecl outside their processes -----------
def _inputs(bundle, batch: int, seed: int) -> np.ndarray:
    from edgecl.compiler.golden import bundle_canaries

    return bundle_canaries(bundle, batch, seed)


def _task_arrays(bundle, task: str) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from edgecl.runtime.session import activate

    a = activate(bundle, task)
    return a.params, a.head


def prepare_ort(bundle, tasks: list[str], workdir: Path) -> list[str]:
    """One self-contained .onnx per task: the bundle's graph with ``W ⊙ M`` and the head as
    ordinary initializers (what a user of plain ONNX Runtime would load)."""
    import onnx
    from onnx import numpy_helper

    exp = bundle.manifest.get("exports", {}).get("onnx")
    if not exp:
        raise RuntimeError("the bundle holds no ONNX export (edgecl compile, or onnx_export.export_bundle)")
    files = []
    for i, name in enumerate(tasks):
        info = bundle.task(name)
        m = onnx.load_from_string((bundle.root / exp["files"][str(len(info["classes"]))]).read_bytes())
        params, head = _task_arrays(bundle, name)
        values = {**params, "head.weight": head[0], "head.bias": head[1]}
        inits = []
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t = numpy_helper.from_array(np.ascontiguousarray(values[t.name], np.float32), t.name)
            inits.append(t)
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
        path = workdir / f"task{i}.onnx"
        onnx.save_model(m, str(path))
        files.append(str(path))
    return files


def prepare_litert(bundle, tasks: list[str], workdir: Path) -> list[str]:
    """One complete .tflite per task (the bundle's template with the task's weights written in)."""
    from edgecl.runtime.backends.tflite import TfliteBackend

    be = TfliteBackend.open(bundle)
    files = []
    for i, name in enumerate(tasks):
        path = workdir / f"task{i}.tflite"
        path.write_bytes(be.model_bytes(bundle.task(name)))
        files.append(str(path))
    return files


def zoo_peer_module(name: str, kwargs: dict, classes: int, feature_dim: int):
    """(the zoo's own ``nn.Module`` up to the features + a ``Linear`` head, the prefix that
    maps its body's parameter names to the graph's). The head replaces the last Linear
    (the zoo's classifiers); a model whose features are a submodule (``encoder``) or its
    output (``output``) gets the head after that."""
    import torch

    from edgecl.models.importer import ZOO_FEATURES, zoo_module

    module, _ = zoo_module(name, **kwargs)
    feat = ZOO_FEATURES.get(name)
    prefix = ""
    if feat is None:
        last = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        parent, _, attr = last.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, torch.nn.Identity())
        body = module
    elif feat == "output":
        body = module
    else:
        body, prefix = module.get_submodule(feat), feat + "."
    return torch.nn.Sequential(body, torch.nn.Linear(feature_dim, classes)).eval(), prefix


def _zoo_state(peer, prefix: str, params: dict, head) -> dict:
    """The peer's state dict holding the given weights (the graph's, by name): a
    BatchNorm that the import folded into the layer before it becomes the identity (its
    bias takes the folded bias where that layer has none)."""
    import torch

    def graph_name(path: str) -> str | None:  # a body path -> the graph's name for it
        for g in (prefix + path, prefix + path.removeprefix("model.")):  # Pixels wraps as `model`
            if g in params:
                return g
        return None

    state = {k: v.detach().clone() for k, v in peer.state_dict().items()}
    for k in list(state):
        g = graph_name(k[2:]) if k.startswith("0.") else None
        if g is not None:
            state[k] = torch.from_numpy(np.array(params[g], np.float32)).reshape(state[k].shape)
    bns = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    for parent_path, parent in peer[0].named_modules():
        prev = None
        for child_name, child in parent.named_children():
            path = f"{parent_path}.{child_name}" if parent_path else child_name
            if isinstance(child, bns) and graph_name(path + ".weight") is None:
                key = f"0.{path}"
                state[key + ".weight"] = torch.ones_like(state[key + ".weight"])
                state[key + ".bias"] = torch.zeros_like(state[key + ".bias"])
                state[key + ".running_mean"] = torch.zeros_like(state[key + ".running_mean"])
                state[key + ".running_var"] = torch.full_like(state[key + ".running_var"], 1.0 - child.eps)
                folded = None if prev is None or getattr(prev[1], "bias", None) is not None \
                    else graph_name(prev[0] + ".bias")
                if folded is not None:
                    state[key + ".bias"] = torch.from_numpy(np.array(params[folded], np.float32))
            prev = (path, child) if isinstance(child, (torch.nn.Conv2d, torch.nn.Linear)) else None
    state["1.weight"] = torch.from_numpy(np.array(head[0], np.float32))
    state["1.bias"] = torch.from_numpy(np.array(head[1], np.float32))
    return state


def check_zoo_peer(bundle, peer, prefix: str, x: np.ndarray, head) -> float:
    """Max |peer - numpy reference| / max |reference| of the features, with the bundle's
    *unmasked* backbone: proves the name mapping and the folded BatchNorms. (Relative to
    the features' own scale: a randomly initialised zoo backbone's can be ~1e-8.)"""
    import torch

    from edgecl.runtime import executor

    g = bundle.graph
    params = {n: np.asarray(bundle.backbone[n]) for n in g.params}
    peer.load_state_dict(_zoo_state(peer, prefix, params, head))
    with torch.inference_mode():
        got = peer[0](torch.from_numpy(x)).numpy()
    want = executor.features(g, params, x)
    scale = float(np.abs(want).max())
    if got.shape != want.shape or not scale > 0:
        return float("inf") if got.shape != want.shape else float(np.abs(got).max())
    return float(np.abs(got - want).max()) / scale


def guess_zoo(bundle) -> dict | None:
    """The zoo model a bundle was made from, when its ``arch`` names one (kwargs from the
    input shape); the torch peer checks it against the bundle before using it."""
    try:
        from edgecl.models.zoo import ZOO
    except ImportError:
        return None
    entry = ZOO.get(str(bundle.model.get("arch")))
    if entry is None:
        return None
    shape, kwargs = tuple(bundle.graph.input_shape), {}
    if shape != entry.input_shape and len(shape) == 3 and entry.name not in ("ds-cnn",):
        kwargs["input_size"] = [int(shape[1]), int(shape[2])]
    if shape != entry.input_shape and entry.input_dtype == "int64":
        kwargs["seq_len"] = int(shape[0])
    return {"name": entry.name, "kwargs": kwargs}


def prepare_torch(bundle, tasks: list[str], workdir: Path, zoo: dict | None, x1: np.ndarray,
                  log=print) -> tuple[list[str], dict]:
    """Per task, a safetensors file the torch peer loads; the zoo module when it reproduces
    the bundle's backbone (checked against the numpy reference), else the graph's parameters
    for torchnet."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    zoo = zoo if zoo is not None else guess_zoo(bundle)
    files, note = [], None
    if zoo is not None:
        try:
            classes = [len(bundle.task(t)["classes"]) for t in tasks]
            if len(set(classes)) != 1:
                raise ValueError(f"tasks with different class counts {classes}")
            peer, prefix = zoo_peer_module(zoo["name"], zoo.get("kwargs", {}), classes[0],
                                           bundle.graph.feature_dim)
            arrays = [_task_arrays(bundle, t) for t in tasks]
            err = check_zoo_peer(bundle, peer, prefix, x1, arrays[0][1])
            if not err < 1e-3:
                raise ValueError(f"it does not reproduce the bundle's backbone (max rel. diff {err:.2g})")
            states = [_zoo_state(peer, prefix, *a) for a in arrays]
            for i, st in enumerate(states):
                path = workdir / f"task{i}-torch.safetensors"
                save_file({k: v.contiguous() for k, v in st.items()}, str(path))
                files.append(str(path))
            return files, {"zoo": {"name": zoo["name"], "kwargs": zoo.get("kwargs", {}),
                                   "classes": classes[0], "feature_dim": bundle.graph.feature_dim},
                           "model": f"zoo module {zoo['name']} {zoo.get('kwargs', {})}"}
        except Exception as e:  # a user bundle whose arch merely shares a zoo name, a new layout
            note = f"zoo module {zoo['name']} not used ({type(e).__name__}: {e}); graph via torchnet"
            log(f"torch: {note}")
    for i, name in enumerate(tasks):
        params, head = _task_arrays(bundle, name)
        used = {n for node in bundle.graph.backbone_nodes for n in node.inputs}
        st = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items() if k in used}
        st["head.weight"], st["head.bias"] = (torch.from_numpy(np.array(h, np.float32)) for h in head)
        path = workdir / f"task{i}-torch.safetensors"
        save_file(st, str(path))
        files.append(str(path))
    return files, {"zoo": None, "model": "graph via torchnet" + (f" ({note})" if note else "")}


# -- one run ------------------------------------------------------------------------------
def run_bench(bundle_dir, backends=None, batches=(1, 32), json_path=None, plot_path=None,
              iters: int = 20000, log=print, *, seconds: float = 2.0, min_iters: int = 10,
              switch_rounds: int = 10, zoo: dict | None = None, workdir=None) -> list[dict]:
    """Every row asked (``ROWS``), each in its own process; returns the rows (unusable
    ones are logged and skipped). ``zoo``: ``{"name", "kwargs"}`` of the zoo model the
    bundle came from, for the torch peer (else guessed from the bundle's ``arch``)."""
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.session import Runtime

    bundle = Bundle.open(bundle_dir)
    n_weights = int(bundle.model.get("n_weights") or bundle.graph.n_weights)
    backends = list(backends or ROWS)
    for name in backends:
        if name not in ROWS:
            raise ValueError(f"unknown bench row {name!r}; choose from {', '.join(ROWS)}")
    shown = [int(b) for b in batches]
    batches = sorted(set(shown) | {1})  # batch 1 always: cold load and the check run on it
    tasks = bundle.task_names[:2]
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgecl-bench-")
        workdir = tmp.name
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = {}
        for b in batches:
            path = work / f"x-b{b}.npy"
            np.save(path, _inputs(bundle, b, b))
            inputs[str(b)] = str(path)
        x1 = np.load(inputs["1"])
        ref = Runtime(bundle).logits(x1, tasks[0])
        base = {"bundle": str(bundle_dir), "batches": batches, "iters": int(iters), "seconds": float(seconds),
                "min_iters": int(min_iters), "switch_rounds": int(switch_rounds), "n_tasks": len(tasks),
                "inputs": inputs}
        prepare = {"ort": prepare_ort, "litert": prepare_litert}
        results: dict[str, dict] = {}
        torch_model = ""
        for name in backends:
            spec = dict(base, row=name)
            try:
                if name in prepare:
                    spec["files"] = prepare[name](bundle, tasks, work)
                elif name == "torch":
                    spec["files"], spec["torch"] = prepare_torch(bundle, tasks, work, zoo, x1, log=log)
                    torch_model = spec["torch"]["model"]
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            else:
                results[name] = run_child(spec, work)
        router = None
        if bundle.manifest.get("default_router"):
            res = run_child(dict(base, row="router"), work)
            if "error" in res:
                log(f"router: not measured ({res['error']})")
            router = res.get("router")
        rows = []
        for name in backends:
            res = results[name]
            if "error" in res:
                log(f"{name}: skipped ({res['error']})")
                continue
            first = np.asarray(res["first"], np.float64).reshape(ref.shape)
            check = float(np.abs(first - ref).max()) / max(1e-30, float(np.abs(ref).max()))
            for r in res["rows"]:
                if r["batch"] not in shown:
                    continue
                row = {"backend": name, "kind": "edgecl" if name in EDGECL_ROWS else "peer",
                       "provider": res["provider"], **r, "cold_load_s": res["cold_load_s"],
                       "task_switch_s": res["task_switch_s"],
                       "task_switch_us_per_mweight": res["task_switch_s"] * 1e6 / (n_weights / 1e6),
                       "peak_rss_bytes": res["peak_rss_bytes"], "check": check, "n_weights": n_weights}
                if name == "torch":
                    row["torch_model"] = torch_model
                if router is not None:
                    row["router"], row["router_s"] = router["name"], router["s"][str(r["batch"])]
                    row["router_share"] = row["router_s"] / r["p50_s"]
                rows.append(row)
        add_ratios(rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    log(table(rows))
    if router is not None:
        log(f"router {router['name']}: " + ", ".join(f"{router['s'][str(b)] * 1e6:.1f} us at batch {b}"
                                                     for b in shown)
            + " (numpy, one thread; 'router %' = its time as a share of that row's inference)")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    if plot_path and rows:
        plot(rows, plot_path, title=f"{bundle.model.get('arch')} ({Path(bundle_dir).name})")
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``x_peer``: each row's p50 over the fastest peer's at the same batch (``fastest_peer``)."""
    for b in {r["batch"] for r in rows}:
        peers = [r for r in rows if r["batch"] == b and r["kind"] == "peer"]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["p50_s"])
        for r in rows:
            if r["batch"] == b:
                r["fastest_peer"], r["x_peer"] = best["backend"], r["p50_s"] / best["p50_s"]


def summary(rows: list[dict]) -> dict:
    """Per batch: edgecl's fastest row against the fastest peer, the TVM row's own ratio,
    and the router's share of edgecl's fastest batch-1 inference."""
    out: dict = {"batches": {}}
    for b in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == b]
        ours = [r for r in at if r["kind"] == "edgecl"]
        peers = [r for r in at if r["kind"] == "peer"]
        s: dict = {}
        if ours:
            best = min(ours, key=lambda r: r["p50_s"])
            s.update(edgecl=best["backend"], edgecl_provider=best["provider"].split(" ")[0],
                     edgecl_p50_s=best["p50_s"])
            if "router_s" in best:
                s["router_share"] = best["router_s"] / best["p50_s"]
        if peers:
            best_peer = min(peers, key=lambda r: r["p50_s"])
            s.update(peer=best_peer["backend"], peer_p50_s=best_peer["p50_s"])
            if ours:
                s["ratio"] = s["edgecl_p50_s"] / best_peer["p50_s"]
            tvm = next((r for r in at if r["backend"] == "tvm"), None)
            s["tvm_ratio"] = None if tvm is None else tvm["p50_s"] / best_peer["p50_s"]
        out["batches"][b] = s
    return out


def _us(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e6:,.1f}"


def table(rows: list[dict]) -> str:
    from .tables import render

    body = []
    for r in rows:
        body.append([r["backend"], r["provider"].split(",")[0] if r["kind"] == "peer" else r["provider"],
                     r["batch"], _us(r["p50_s"]), _us(r.get("p50_backend_s")), _us(r["p99_s"]),
                     f"{r['x_peer']:.2f}" if "x_peer" in r else "-", f"{r['throughput_per_s']:,.0f}",
                     f"{r['cold_load_s'] * 1e3:,.0f}", _us(r["task_switch_s"]),
                     "-" if not math.isfinite(r["task_switch_us_per_mweight"])
                     else f"{r['task_switch_us_per_mweight']:,.0f}",
                     f"{r['peak_rss_bytes'] / 2**20:,.0f}",
                     f"{100 * r['router_share']:.1f}" if "router_share" in r else "-", f"{r['check']:.1e}"])
    out = render(["row", "provider", "batch", "p50 us", "own p50", "p99 us", "x peer", "samples/s", "cold ms",
                  "switch us", "us/Mweight", "RSS MiB", "router %", "check"], body)
    return out + ("\nx peer: p50 over the fastest peer's (ort, litert, torch) at the same batch (lower is "
                  "faster); own p50: an edgecl row's backend alone (run_checked, no input validation); "
                  "check: batch-1 logits vs the numpy reference, max |diff| / max |ref|")


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4 * (len(batches) + 1), 3.5))
    for ax, b in zip(axes, batches, strict=False):
        vals = [next((r["p50_s"] * 1e6 for r in rows if r["backend"] == n and r["batch"] == b), 0)
                for n in backends]
        ax.bar(backends, vals)
        ax.set_title(f"p50 latency, batch {b} (us)")
        ax.tick_params(axis="x", rotation=30)
    ax = axes[-1]
    vals = [next(r["task_switch_s"] * 1e6 for r in rows if r["backend"] == n) for n in backends]
    ax.bar(backends, vals)
    ax.set_title("task switch (us)")
    ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_DIR",
                        help="a bundle, or 'zoo' (every zoo model), 'kernels', 'learn', 'open', 'daemon'")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"rows, comma-separated (default {DEFAULT_BACKENDS}); unusable ones are skipped")
    parser.add_argument("--batch", help="comma-separated batch sizes (default 1,32; zoo: 1,8)")
    parser.add_argument("--iters", type=int, default=20000, help="samples per measurement (default 20000)")
    parser.add_argument("--seconds", type=float,
                        help="at most this long per measurement (default 2; zoo --quick 0.2)")
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="write a comparison plot")
    parser.add_argument("--models", help="zoo: comma-separated (default: all; see edgecl.tools.bench_zoo)")
    parser.add_argument("--out", metavar="OUT.json", help="zoo: write every model's rows and the summary")
    parser.add_argument("--quick", action="store_true", help="zoo: tiny iteration counts (plumbing only)")
    parser.add_argument("--rebuild", action="store_true", help="zoo: make the cached bundles anew")


def _batches(value: str | None, default: str) -> list[int]:
    return [int(b) for b in str(value or default).split(",") if b]


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.errors import EdgeclError

    backends = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    unknown = [b for b in backends if b not in ROWS]
    if unknown or not backends:  # a misspelled row is a bad argument, not a row to skip
        raise EdgeclError(f"unknown --backends {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(ROWS)}")
    skipped: list[str] = []

    def log(line: str) -> None:
        print(line)
        if ": skipped (" in line:
            skipped.append(line)

    rows = run_bench(args.bundle, backends, _batches(args.batch, "1,32"), args.json, args.plot,
                     iters=args.iters, seconds=args.seconds or 2.0, log=log)
    if not rows:
        raise EdgeclError("none of the asked --backends could run on this bundle: " + "; ".join(skipped))
    return 0


def zoo_or(cmd):
    """The ``bench`` command: ``edgecl bench zoo ...`` here, every other form to ``cmd``."""

    def run(args: argparse.Namespace) -> int:
        if args.bundle == "zoo" and not Path("zoo").is_dir():
            from .bench_zoo import main as zoo_main

            return zoo_main(args)
        return cmd(args)

    return run


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="edgecl bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args()
    if a.bundle == "zoo":
        from edgecl.tools.bench_zoo import main as _zoo_main

        sys.exit(_zoo_main(a))
    sys.exit(main(a))

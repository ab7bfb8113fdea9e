"""``edgecl bench learn``: the device learner against PyTorch eager autograd, one run.

The same masked update on the same model (default MLP 64-256-256, a 10-class head,
batch 32): forward, cross-entropy, backward, then a masked Adam step —

* ``packnet``: Adam on the free weights only (half the weights owned by earlier tasks,
  left byte-identical), plus the head;
* ``supsup``: Adam on every score (straight-through over a top-50 % supermask of a frozen
  backbone), plus the head.

``device`` is :func:`edgecl.runtime.learn.trainer.numpy_step` on the MLP as a model graph
(numpy forward/backward through the op registry and the executor, the C kernels'
``masked_adam_`` / ``materialize_bits``; SupSup's exact per-site top-k recomputed every
step, found incrementally by ``trainer.TopK``), imported without torch.
``torch`` is PyTorch eager: autograd, ``torch.optim.Adam``, frozen gradients zeroed and
owned weights written back after the step (as the host's PackNet does), or the
straight-through supermask with a ``torch.topk`` per layer every step (as the host's
SupSup). Each runs in its own fresh process;
both sides get the same BLAS/OpenMP thread count (default 1, the learner child's); step
time is the median of ``steps`` timed steps after warm-up; peak RSS is the
process's ``VmHWM`` (imports included: what a device would have to hold).

    edgecl bench learn [--json OUT] [--steps N]
    python -m edgecl.tools.bench_learn [--json OUT]

``--zoo ds-cnn,mobilenet-v2`` (:func:`run_zoo_bench`): on real edge backbones, SupSup scores
of the last ``K`` mask sites + a head, the rest frozen (``train_last=K``), three ways, each
in its own process at one thread: ``edgecl`` (``trainer.Problem`` + ``trainer.numpy_step``,
the learner's own step, without torch), ``torch`` eager (the zoo module with BN folded and
the graph's weights, the same sites masked by a straight-through top-50 % of their scores,
Adam) and ONNX Runtime training (``onnxruntime-training`` 1.19.2 in ``.venv-orttrain``,
``scripts/setup_orttrain.sh``: the graph exported to ONNX, ``generate_artifacts`` with the
same sites' *weights* + head trainable and everything else in ``frozen_params``, AdamW
without decay — the supermask's straight-through gradient needs a stop-gradient that ONNX
lacks, so it is not expressed there: ORT does the same-size update on the weights). Step time
(wall and CPU p50), peak RSS (``VmHWM``) and the ratios; see docs/learning.md.

    edgecl bench learn --zoo ds-cnn,mobilenet-v2 [--zoo-steps N] [--zoo-rounds R] [--train-last K] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HIDDEN = (256, 256)
BATCH = 32
CLASSES = 10

_DEVICE = r"""
import json, sys, time
import numpy as np
from edgecl.runtime.graph import Graph, Node, Param, Value
from edgecl.runtime.learn import trainer
from edgecl.runtime.learn.progress import peak_rss_bytes
method, steps, hidden = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
batch, classes = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
params, nodes, cur, prev = [], [], "x", 64
for i, w in enumerate(hidden, 1):
    ins = [cur, f"fc{i}.weight"]
    params.append(Param(f"fc{i}.weight", (w, prev), "weight"))
    if method == "packnet":
        params.append(Param(f"fc{i}.bias", (w,), "bias"))
        ins.append(f"fc{i}.bias")
    nodes += [Node(f"fc{i}", "Linear", tuple(ins), (f"fc{i}",)),
              Node(f"relu{i}", "Relu", (f"fc{i}",), (f"relu{i}",))]
    cur, prev = f"relu{i}", w
graph = Graph([Value("x", (64,))], params, nodes, cur, name="mlp")
backbone, old = {}, {}
for s in graph.mask_sites():
    w0 = rng.standard_normal(s.shape) * (2 / s.shape[1]) ** 0.5
    backbone[s.weight] = w0.astype(np.float32)
    if s.bias is not None:
        backbone[s.bias] = np.zeros(s.shape[0], np.float32)
    old[s.weight] = (rng.random(s.shape) < 0.5).reshape(-1)  # entries an old task owns
x = rng.random((1024, 64), dtype=np.float32)
y = rng.integers(0, classes, 1024)
hp = {"lr": 1e-3, "density": 0.5, "epochs": 1, "retrain_epochs": 1, "prune": 0.5}
m = trainer.get_method(method)
p = trainer.Problem(graph, backbone, old if m.needs_owned else {}, x, y, classes, m, hp, batch, 0)
s = p.initial()
idx = [rng.integers(0, 1024, batch) for _ in range(steps + 10)]
for i in range(10):
    trainer.numpy_step(p, s, idx[i])
times = []
for i in range(steps):
    t = time.perf_counter(); trainer.numpy_step(p, s, idx[10 + i]); times.append(time.perf_counter() - t)
assert "torch" not in sys.modules
print("BENCH " + json.dumps({"step_s": float(np.median(times)), "peak_rss_bytes": peak_rss_bytes()}))
"""

_TORCH = r"""
import json, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from edgecl.runtime.learn.progress import peak_rss_bytes
method, steps, hidden = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
batch, classes = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
dims = [64, *hidden]
ws, bs, frozen = [], [], []
for a, b in zip(dims[:-1], dims[1:]):
    w0 = (rng.standard_normal((b, a)) * (2 / a) ** 0.5).astype(np.float32)
    ws.append(torch.tensor(w0, requires_grad=method == "packnet"))
    bs.append(torch.zeros(b) if method == "packnet" else None)
    frozen.append(torch.from_numpy(rng.random((b, a)) < 0.5))
hw = torch.zeros(classes, dims[-1], requires_grad=True)
hb = torch.zeros(classes, requires_grad=True)
x = torch.from_numpy(rng.random((1024, 64), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, classes, 1024))
idx = [torch.from_numpy(rng.integers(0, 1024, batch)) for _ in range(steps + 10)]

class ST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, m):
        return m
    @staticmethod
    def backward(ctx, g):
        return g, None

if method == "packnet":
    opt = torch.optim.Adam([*ws, hw, hb], lr=1e-3)
    old = [w.detach().clone() for w in ws]
    def step(i):
        h = x[i]
        for w, b in zip(ws, bs):
            h = F.relu(F.linear(h, w, b))
        loss = F.cross_entropy(F.linear(h, hw, hb), y[i])
        opt.zero_grad(); loss.backward()
        for w, f in zip(ws, frozen):
            w.grad[f] = 0
        opt.step()
        with torch.no_grad():
            for w, f, o in zip(ws, frozen, old):
                w.copy_(torch.where(f, o, w))
else:
    scores = [torch.empty_like(w).uniform_(-0.1, 0.1).requires_grad_(True) for w in ws]
    opt = torch.optim.Adam([*scores, hw, hb], lr=1e-3)
    def step(i):
        h = x[i]
        for w, s in zip(ws, scores):
            k = int(round(s.numel() * 0.5))
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[torch.topk(s.detach().reshape(-1), k, sorted=False).indices] = True
            h = F.relu(F.linear(h, w * ST.apply(s, m.view(s.shape).float())))
        loss = F.cross_entropy(F.linear(h, hw, hb), y[i])
        opt.zero_grad(); loss.backward(); opt.step()
for i in range(10):
    step(idx[i])
times = []
for i in range(steps):
    t = time.perf_counter(); step(idx[10 + i]); times.append(time.perf_counter() - t)
print("BENCH " + json.dumps({"step_s": float(np.median(times)), "peak_rss_bytes": peak_rss_bytes(),
                             "threads": torch.get_num_threads()}))
"""


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _child(code: str, method: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})  # the same for both sides
    r = subprocess.run([sys.executable, "-c", code, method, str(steps), json.dumps(list(HIDDEN)),
                        str(BATCH), str(CLASSES)], capture_output=True, text=True, env=env,
                       timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"bench child failed ({r.returncode}): {r.stderr.strip()[-800:]}")


def run_learn_bench(json_path: str | Path | None = None, steps: int = 200,
                    methods: tuple[str, ...] = ("packnet", "supsup"), threads: int = 1,
                    echo: bool = True) -> list[dict]:
    """Device learner vs PyTorch eager per method: step time and peak RSS, as ratios."""
    from edgecl import kernels

    rows = []
    for method in methods:
        dev = _child(_DEVICE, method, steps, threads)
        ref = _child(_TORCH, method, steps, threads)
        rows.append({"method": method, "model": f"mlp 64-{'-'.join(map(str, HIDDEN))}", "batch": BATCH,
                     "steps_timed": steps,
                     "device_step_ms": dev["step_s"] * 1e3, "torch_step_ms": ref["step_s"] * 1e3,
                     "speedup": ref["step_s"] / dev["step_s"],
                     "device_peak_rss_mib": dev["peak_rss_bytes"] / 2**20,
                     "torch_peak_rss_mib": ref["peak_rss_bytes"] / 2**20,
                     "rss_ratio": dev["peak_rss_bytes"] / ref["peak_rss_bytes"],
                     "threads": threads, "torch_threads": ref.get("threads")})
    if echo:
        from .tables import render

        print(render(["method", "device step", "torch step", "speedup", "device peak RSS",
                      "torch peak RSS", "RSS ratio"],
                     [[r["method"], f"{r['device_step_ms']:.3f} ms", f"{r['torch_step_ms']:.3f} ms",
                       f"{r['speedup']:.2f}x", f"{r['device_peak_rss_mib']:.1f} MiB",
                       f"{r['torch_peak_rss_mib']:.1f} MiB", f"{r['rss_ratio']:.2f}"] for r in rows]))
        print(f"(MLP 64-{'-'.join(map(str, HIDDEN))}, batch {BATCH}, median of {steps} steps; "
              f"{threads} thread(s) each; kernels: {kernels.status()}; "
              f"targets: >= 2x faster, <= 1/3 of torch's RSS)")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


# ------------------------------------------------------------------ the zoo mode
# ``edgecl bench learn --zoo ds-cnn,mobilenet-v2``: the device step on real edge
# backbones, last blocks + head trainable, against torch eager and ONNX Runtime training.
#
# name -> (zoo model, its factory's kwargs, K = the last K mask sites trained, what they are)
ZOO_CASES: dict[str, tuple[str, dict, int, str]] = {
    "ds-cnn": ("ds-cnn", {}, 4,
               "1x49x10; K=4: the last two depthwise-separable blocks (dw 3x3 + pw 1x1, twice)"),
    "mobilenet-v2": ("mobilenet-v2", {"width": 0.35, "input_size": 96}, 4,
                     "width 0.35 at 3x96x96; K=4: the last inverted residual (expand 1x1, dw 3x3, "
                     "project 1x1) + the 1x1 conv to 1280"),
    "mobilenet-v2-1.0": ("mobilenet-v2", {"width": 1.0, "input_size": 224}, 4,
                         "width 1.0 at 3x224x224; K=4: the last inverted residual + the 1x1 conv to 1280"),
}
ZOO_CLASSES = 10  # the new task's head
ZOO_LR = 1e-2  # the device's SupSup Adam lr (trainer.DEFAULTS)
ORTTRAIN_VENV = ".venv-orttrain"  # scripts/setup_orttrain.sh

# Every child draws the same data: a pool of 2 batches of uniform inputs (the zoo models
# take [0, 1]) and random labels, and the same batch indices (PCG64, the same stream in
# numpy 1.x and 2.x).
_ZOO_DATA = r"""
import json, sys, time
import numpy as np
cfg = json.load(open(sys.argv[1]))
B, C, K = cfg["batch"], cfg["classes"], cfg["train_last"]
WARM, STEPS = cfg["warmup"], cfg["steps"]
rng = np.random.default_rng(0)
POOL = 2 * B
x = rng.random((POOL, *cfg["input_shape"]), dtype=np.float32)
y = rng.integers(0, C, POOL)
idx = [rng.integers(0, POOL, B) for _ in range(WARM + STEPS)]

def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def timed(step):
    losses, times, cpu = [], [], []
    for i in range(WARM):
        losses.append(step(idx[i]))
    for i in range(STEPS):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(idx[WARM + i]))
        times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    return {"step_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90)),
            "cpu_s": float(np.median(cpu)), "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
"""

# (a) edgecl: the learner's own Problem + numpy_step (supsup, train_last=K), without torch.
_ZOO_DEVICE = _ZOO_DATA + r"""
from edgecl.runtime.graph import Graph
from edgecl.runtime.learn import trainer
from edgecl.runtime.safetensors_mmap import read_safetensors
graph = Graph.from_dict(json.load(open(cfg["graph"]))["graph"])
weights, _ = read_safetensors(cfg["weights"], mapped=False)
hp = {"lr": cfg["lr"], "density": 0.5, "epochs": 1}
p = trainer.Problem(graph, weights, {}, x, y, C, "supsup", hp, B, 0, train_last=K)
assert p.trainable == cfg["site_nodes"], (p.trainable, cfg["site_nodes"])
s = p.initial()
r = timed(lambda i: trainer.numpy_step(p, s, i))
assert "torch" not in sys.modules
r.update(peak_rss_bytes=vmhwm(), trained=sorted(k for k in s.arrays if k.startswith(("scores.", "head."))))
print("BENCH " + json.dumps(r))
"""

# (b) torch eager: the zoo module as imported, BN folded (as the graph), the graph's weights;
# the same K sites masked by a straight-through top-50 % supermask of their scores
# (torch.topk every step, as the host's SupSup), the same head, Adam; every backbone
# parameter has requires_grad=False, so nothing before the first masked conv is recorded
# by autograd (what torch.no_grad() over the frozen prefix does).
_ZOO_TORCH = _ZOO_DATA + r"""
import torch
import torch.nn.functional as F
from edgecl.tools.bench_learn import torch_zoo_features
from safetensors.numpy import load_file
torch.manual_seed(0)
weights = load_file(cfg["weights"])
net = torch_zoo_features(cfg["model"], cfg["zoo_kwargs"], weights)

class ST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, m):
        return m
    @staticmethod
    def backward(ctx, g):
        return g, None

scores = []
for wname in cfg["site_weights"]:
    conv = net.get_submodule(wname.rsplit(".", 1)[0])
    n = conv.weight.numel()
    bound = (6.0 / (n // conv.weight.shape[0])) ** 0.5
    s = torch.empty_like(conv.weight).uniform_(-bound, bound).requires_grad_(True)
    scores.append(s)
    def masked(inp, conv=conv, s=s, k=max(1, round(n * 0.5))):
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[torch.topk(s.detach().reshape(-1), k, sorted=False).indices] = True
        return conv._conv_forward(inp, conv.weight * ST.apply(s, m.view(s.shape).float()), conv.bias)
    conv.forward = masked
feat = int(cfg["feature_dim"])
hw = torch.empty(C, feat).uniform_(-feat ** -0.5, feat ** -0.5).requires_grad_(True)
hb = torch.empty(C).uniform_(-feat ** -0.5, feat ** -0.5).requires_grad_(True)
opt = torch.optim.Adam([*scores, hw, hb], lr=cfg["lr"])
xt, yt = torch.from_numpy(x), torch.from_numpy(y)
net.eval()

def step(i):
    i = torch.from_numpy(i)
    loss = F.cross_entropy(F.linear(net(xt[i]), hw, hb), yt[i])
    opt.zero_grad(); loss.backward(); opt.step()
    return loss.item()

r = timed(step)
r.update(peak_rss_bytes=vmhwm(), threads=torch.get_num_threads(),
         trainable=sum(p.numel() for p in [*scores, hw, hb]),
         requires_grad=sum(p.numel() for p in net.parameters() if p.requires_grad))
print("BENCH " + json.dumps(r))
"""

# (c) ONNX Runtime training, in .venv-orttrain (onnxruntime-training 1.19.2, numpy<2,
# onnx 1.16; no torch, no edgecl). Its package __init__ imports torch (for ORTModule); the
# on-device API (artifacts, api) does not need it, so the package is entered without it.
_ORT_IMPORT = r"""
import os, types, importlib.util
_spec = importlib.util.find_spec("onnxruntime")
_pkg = types.ModuleType("onnxruntime.training")
_pkg.__path__ = [os.path.join(os.path.dirname(_spec.origin), "training")]
sys.modules.setdefault("onnxruntime.training", _pkg)
import onnxruntime as ort
"""

_ZOO_ORT_ARTIFACTS = _ZOO_DATA + _ORT_IMPORT + r"""
import onnx
from onnxruntime.training import artifacts
model = onnx.load(cfg["onnx"])
artifacts.generate_artifacts(model, requires_grad=cfg["ort_trainable"], frozen_params=cfg["ort_frozen"],
                             loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.AdamW,
                             artifact_directory=cfg["ort_dir"])
print("BENCH " + json.dumps({"onnxruntime": ort.__version__, "onnx": onnx.__version__}))
"""

_ZOO_ORT = _ZOO_DATA + _ORT_IMPORT + r"""
from onnxruntime.training.api import CheckpointState, Module, Optimizer
d = cfg["ort_dir"]
so = ort.SessionOptions()
so.intra_op_num_threads = so.inter_op_num_threads = cfg["threads"]
state = CheckpointState.load_checkpoint(os.path.join(d, "checkpoint"))
module = Module(os.path.join(d, "training_model.onnx"), state, device="cpu", session_options=so)
opt = Optimizer(os.path.join(d, "optimizer_model.onnx"), module)
opt.set_learning_rate(cfg["lr"])
module.train()
trainable = int(module.get_parameters_size(True))

def step(i):
    loss = module(x[i], y[i].astype(np.int64))
    opt.step(); module.lazy_reset_grad()
    return float(loss)

r = timed(step)
r.update(peak_rss_bytes=vmhwm(), onnxruntime=ort.__version__, trainable=trainable)
print("BENCH " + json.dumps(r))
"""


def torch_zoo_features(model: str, zoo_kwargs: dict, weights: dict):
    """The zoo module as ``edgecl import`` imports it, up to the features (the last Linear
    dropped: the task's head replaces it), every BatchNorm folded into its conv (as the
    importer folds it) and every parameter set to the graph's ``weights`` (by name); all
    frozen (``requires_grad=False``). Its output equals the graph's features."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from edgecl.models.zoo import build

    net = build(model, **zoo_kwargs)
    pre = (getattr(net, "zoo_meta", {}) or {}).get("preprocessing") or {}
    if "mean" in pre and "std" in pre:  # its pixel preprocessing in front, as imported
        from edgecl.models.importer import zoo_module

        net, _ = zoo_module(model, **zoo_kwargs)
    net = net.eval()
    for m in list(net.modules()):
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(conv, bn), nn.Identity()
    last = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = last.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, nn.Identity())
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            p = params.get(name, params.get("model." + name))
            if p is None or tuple(p.shape) != tuple(w.shape):
                raise ValueError(f"{model}: graph parameter {name} {tuple(w.shape)} has no match in "
                                 "the module")
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _onnx_forward(graph, weights: dict, classes: int, path: Path) -> None:
    """The graph + a head as an ONNX model (``compiler.onnx_export.build_model``, op by op
    through the registry) with the graph's weights inlined: input ``x``, output ``logits``."""
    import onnx
    from onnx import numpy_helper

    from edgecl.compiler.onnx_export import build_model

    m = build_model(graph, classes, name=graph.name)
    rng = np.random.default_rng(1)
    bound = graph.feature_dim ** -0.5
    values = dict(weights)
    values["head.weight"] = rng.uniform(-bound, bound, (classes, graph.feature_dim)).astype(np.float32)
    values["head.bias"] = rng.uniform(-bound, bound, classes).astype(np.float32)
    inits = []
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            value = np.ascontiguousarray(values[t.name], dtype=np.float32)
            inits.append(numpy_helper.from_array(value, t.name))
        else:
            inits.append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    onnx.save(m, str(path))


def _zoo_child(python: str, code: str, cfg_path: Path, threads: int, timeout: int = 1800) -> dict:
    from edgecl.runtime.learn.learner import child_env

    # every variant in the environment the device learner's child runs in (its glibc malloc
    # settings: activations allocated afresh each step would otherwise fault their pages in
    # again, half of a DS-CNN step), so the variants differ by their code only
    env = dict(child_env(), **{v: str(threads) for v in THREAD_VARS})
    r = subprocess.run([python, "-c", code, str(cfg_path)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=str(cfg_path.parent))
    for line in r.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"bench child failed ({r.returncode}): {r.stderr.strip()[-1500:]}")


def orttrain_python() -> Path | None:
    """The Python of .venv-orttrain (``EDGECL_ORTTRAIN_PYTHON`` overrides), or None."""
    env = os.environ.get("EDGECL_ORTTRAIN_PYTHON")
    p = Path(env) if env else Path(__file__).resolve().parents[1] / ORTTRAIN_VENV / "bin" / "python"
    return p if p.exists() else None


def prepare_zoo(case: tuple[str, dict, int, str], workdir: Path, *, batch: int, steps: int, warmup: int,
                threads: int, train_last: int | None = None, classes: int = ZOO_CLASSES) -> Path:
    """Import the zoo model once (here, with torch): the graph and weights for the device and
    torch children, the ONNX forward model for ONNX Runtime's; returns the config file."""
    from edgecl.models.importer import MODEL_GRAPH, MODEL_WEIGHTS, import_model, save_model

    model, zoo_kwargs, k, _ = case
    k = int(train_last or k)
    graph, weights = import_model(model, zoo_kwargs=zoo_kwargs)
    weights = {n: np.ascontiguousarray(w, dtype=np.float32) for n, w in weights.items()}
    save_model(workdir / "model", graph, weights, source=model)
    sites = graph.mask_sites()[-k:]
    trained = [s.weight for s in sites]
    _onnx_forward(graph, weights, classes, workdir / "forward.onnx")
    (workdir / "ort").mkdir(exist_ok=True)
    cfg = {"model": model, "zoo_kwargs": zoo_kwargs, "train_last": k, "batch": batch, "classes": classes,
           "steps": steps, "warmup": warmup, "threads": threads, "lr": ZOO_LR,
           "input_shape": list(graph.input.shape), "feature_dim": int(graph.feature_dim),
           "graph": str(workdir / "model" / MODEL_GRAPH), "weights": str(workdir / "model" / MODEL_WEIGHTS),
           "site_nodes": [s.node for s in sites], "site_weights": trained,
           "site_numel": int(sum(math.prod(s.shape) for s in sites)),
           "onnx": str(workdir / "forward.onnx"), "ort_dir": str(workdir / "ort"),
           "ort_trainable": [*trained, "head.weight", "head.bias"],
           "ort_frozen": sorted(set(graph.params) - set(trained))}
    path = workdir / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _over_rounds(results: list[dict]) -> dict:
    """One variant's rounds as one result: the median step and CPU time, the largest peak
    RSS, the first round's other fields (losses, counts: the same every round)."""
    out = dict(results[0])
    out["step_s"] = statistics.median(r["step_s"] for r in results)
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in results)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in results)
    return out


def _ratio(num: list[dict], den: list[dict], key: str) -> float:
    """The median over rounds of ``num[i][key] / den[i][key]`` (round i's pair)."""
    return statistics.median(a[key] / b[key] for a, b in zip(num, den, strict=True))


def run_zoo_bench(models: list[str] | tuple[str, ...] = ("ds-cnn", "mobilenet-v2"),
                  json_path: str | Path | None = None, *, steps: int = 30, warmup: int = 5,
                  batch: int = BATCH, threads: int = 1, train_last: int | None = None,
                  cases: dict | None = None, ort_python: str | Path | None = None,
                  echo: bool = True, rounds: int = 1) -> list[dict]:
    """Per zoo model: the edgecl device step, torch eager and ONNX Runtime training doing the
    same update (last K sites + head), each in its own process at ``threads`` thread(s):
    step time p50, peak RSS and the ratios. ONNX Runtime's row is skipped (with the
    reason) when .venv-orttrain is absent. With ``rounds`` > 1 the variants run that many
    times, interleaved (edgecl, torch, ORT, edgecl, ...), and a row holds each variant's
    median over the rounds (its rounds in ``*_runs``; the peak RSS is the largest) and the
    median of the per-round ratios: on a shared host one round's ratio moves with the
    neighbours' load, a median over interleaved rounds much less."""
    import tempfile

    from edgecl import kernels

    cases = {**ZOO_CASES, **(cases or {})}
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    ort_py = Path(ort_python) if ort_python else orttrain_python()
    for name in models:
        if name not in cases:
            raise ValueError(f"unknown zoo bench model {name!r}; have {', '.join(cases)}")
    rows = []
    for name in models:
        with tempfile.TemporaryDirectory(prefix="edgecl-bench-learn-") as tmp:
            cfg_path = prepare_zoo(cases[name], Path(tmp), batch=batch, steps=steps, warmup=warmup,
                                   threads=threads, train_last=train_last)
            cfg = json.loads(cfg_path.read_text())
            ort_skip = None if ort_py else f"{ORTTRAIN_VENV} absent: run scripts/setup_orttrain.sh"
            if ort_py is not None:
                _zoo_child(str(ort_py), _ZOO_ORT_ARTIFACTS, cfg_path, threads)
            runs: dict[str, list[dict]] = {"edgecl": [], "torch": [], "ort": []}
            for _ in range(int(rounds)):
                runs["edgecl"].append(_zoo_child(sys.executable, _ZOO_DEVICE, cfg_path, threads))
                runs["torch"].append(_zoo_child(sys.executable, _ZOO_TORCH, cfg_path, threads))
                if ort_py is not None:
                    runs["ort"].append(_zoo_child(str(ort_py), _ZOO_ORT, cfg_path, threads))
        dev, ref = _over_rounds(runs["edgecl"]), _over_rounds(runs["torch"])
        ort = _over_rounds(runs["ort"]) if runs["ort"] else None
        ms = 1e3
        row = {"model": name, "zoo": cfg["model"], "zoo_kwargs": cfg["zoo_kwargs"], "about": cases[name][3],
               "train_last": cfg["train_last"], "sites": cfg["site_nodes"], "site_weights": cfg["site_numel"],
               "batch": batch, "steps_timed": steps, "threads": threads,
               "rounds": int(rounds),
               "edgecl_step_ms": dev["step_s"] * ms, "torch_step_ms": ref["step_s"] * ms,
               "edgecl_step_ms_runs": [r["step_s"] * ms for r in runs["edgecl"]],
               "torch_step_ms_runs": [r["step_s"] * ms for r in runs["torch"]],
               "edgecl_cpu_ms": dev["cpu_s"] * ms, "torch_cpu_ms": ref["cpu_s"] * ms,
               "torch_over_edgecl_cpu": _ratio(runs["torch"], runs["edgecl"], "cpu_s"),
               "edgecl_peak_rss_mib": dev["peak_rss_bytes"] / 2**20,
               "torch_peak_rss_mib": ref["peak_rss_bytes"] / 2**20,
               "torch_over_edgecl": _ratio(runs["torch"], runs["edgecl"], "step_s"),
               "rss_ratio": dev["peak_rss_bytes"] / ref["peak_rss_bytes"],
               "torch_threads": ref.get("threads"), "torch_trainable": ref["trainable"],
               "edgecl_loss": [dev["loss_first"], dev["loss_last"]],
               "torch_loss": [ref["loss_first"], ref["loss_last"]],
               "ort_step_ms": None, "ort_peak_rss_mib": None, "ort_over_edgecl": None,
               "ort_skipped": ort_skip}
        if ort is not None:
            row.update(ort_step_ms=ort["step_s"] * ms, ort_peak_rss_mib=ort["peak_rss_bytes"] / 2**20,
                       ort_step_ms_runs=[r["step_s"] * ms for r in runs["ort"]],
                       ort_over_edgecl=_ratio(runs["ort"], runs["edgecl"], "step_s"),
                       ort_cpu_ms=ort["cpu_s"] * ms,
                       ort_over_edgecl_cpu=_ratio(runs["ort"], runs["edgecl"], "cpu_s"),
                       ort_trainable=ort["trainable"],
                       ort_loss=[ort["loss_first"], ort["loss_last"]], onnxruntime=ort["onnxruntime"])
        rows.append(row)
    if echo:
        from .tables import render

        def f(v, fmt):
            return "-" if v is None else fmt.format(v)

        print(render(["model", "K", "edgecl step", "torch step", "ORT-train step", "torch/edgecl",
                      "ORT/edgecl", "edgecl RSS", "torch RSS", "ORT RSS", "RSS edgecl/torch"],
                     [[r["model"], str(r["train_last"]), f(r["edgecl_step_ms"], "{:.1f} ms"),
                       f(r["torch_step_ms"], "{:.1f} ms"), f(r["ort_step_ms"], "{:.1f} ms"),
                       f(r["torch_over_edgecl"], "{:.2f}x"), f(r["ort_over_edgecl"], "{:.2f}x"),
                       f(r["edgecl_peak_rss_mib"], "{:.1f} MiB"), f(r["torch_peak_rss_mib"], "{:.1f} MiB"),
                       f(r["ort_peak_rss_mib"], "{:.1f} MiB"), f(r["rss_ratio"], "{:.2f}")] for r in rows]))
        for r in rows:
            ort_cpu = ("" if r["ort_step_ms"] is None else
                       f", ORT {r['ort_cpu_ms']:.1f} ms ({r['ort_over_edgecl_cpu']:.2f}x)")
            print(f"  {r['model']}: CPU time per step (p50): edgecl {r['edgecl_cpu_ms']:.1f} ms, "
                  f"torch {r['torch_cpu_ms']:.1f} ms ({r['torch_over_edgecl_cpu']:.2f}x){ort_cpu}")
            skipped = f"; ORT skipped: {r['ort_skipped']}" if r["ort_skipped"] else ""
            print(f"  {r['model']}: {r['about']}{skipped}")
        over = "" if rounds == 1 else (f", each variant's median over {rounds} interleaved rounds, "
                                       "the ratios the median of the rounds' ratios")
        print(f"(supsup scores of the last K sites + a {ZOO_CLASSES}-class head, batch {batch}, median of "
              f"{steps} steps after {warmup}{over}; {threads} thread(s) each; ORT trains the same sites' "
              f"weights + head (AdamW, no decay); kernels: {kernels.status()}; targets: torch/edgecl >= 2x, "
              f"ORT/edgecl >= 1x, RSS edgecl/torch <= 0.33)")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    p.add_argument("--steps", type=int, default=200, help="timed steps per side (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads for both sides (default 1, as the learner's child)")
    add_zoo_arguments(p)


def add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    """``--zoo`` and its options (also on ``edgecl bench``, for ``edgecl bench learn --zoo``)."""
    p.add_argument("--zoo", metavar="MODELS",
                   help="bench learn: zoo models instead of the MLP, comma-separated "
                        f"({', '.join(ZOO_CASES)}): edgecl vs torch eager vs ONNX Runtime training, "
                        "last K sites + head")
    p.add_argument("--train-last", type=int, metavar="K",
                   help="bench learn --zoo: train the last K mask sites (default per model, 4)")
    p.add_argument("--zoo-steps", type=int, default=30, metavar="N",
                   help="bench learn --zoo: timed steps per side (default 30, after 5 warm-up steps)")
    p.add_argument("--zoo-rounds", type=int, default=1, metavar="R",
                   help="bench learn --zoo: run the variants R times, interleaved, and report each "
                        "one's median and the median of the rounds' ratios (default 1)")


def run_from_args(args: argparse.Namespace) -> int:
    """``edgecl bench learn [--zoo MODELS]`` and ``python -m edgecl.tools.bench_learn``."""
    threads = getattr(args, "threads", None) or 1  # each side at one thread unless --threads N
    if getattr(args, "zoo", None):
        models = [m.strip() for m in args.zoo.split(",") if m.strip()]
        batch = str(getattr(args, "batch", None) or BATCH)  # `edgecl bench`'s --batch, one size here
        if not batch.isdigit():
            raise SystemExit(f"bench learn --zoo: --batch takes one batch size, got {batch!r}")
        run_zoo_bench(models, args.json, steps=args.zoo_steps, batch=int(batch), threads=threads,
                      train_last=args.train_last, rounds=getattr(args, "zoo_rounds", 1))
    else:
        run_learn_bench(args.json, steps=getattr(args, "steps", 200), threads=threads)
    return 0


def main(args: argparse.Namespace) -> int:
    return run_from_args(args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="edgecl bench learn", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))

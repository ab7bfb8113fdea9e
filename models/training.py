"""Host training of a task stream into a run directory, resumable task by task.

A run directory holds ``run.json`` (configuration, tasks learned, the accuracy matrix
measured in PyTorch) and ``state.safetensors`` (the method's tensors). Both are saved
atomically after every task, so a killed run loses at most the task in progress, and
training the same directory with a larger ``--tasks`` continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgecl.runtime.bundle_format import atomic_write_bytes
from edgecl.runtime.errors import EdgeclError
from edgecl.runtime.graph import Graph, GraphError, from_model
from edgecl.runtime.heap import keep_freed_heap

from . import architectures
from .data import Stream, load_stream
from .methods import METHODS, Method

RUN_FORMAT = "edgecl-run"
RUN_FORMAT_VERSION = 1


class RunError(EdgeclError):
    """A run directory that is missing, corrupt, or does not match the request."""


@dataclass
class Run:
    path: Path
    config: dict
    method: Method
    acc_matrix: list[list[float]]

    @property
    def tasks(self) -> list[dict]:
        return self.method.tasks

    @property
    def graph(self) -> Graph:
        return self.method.graph


def new_method(config: dict, backbone: dict[str, np.ndarray] | None = None) -> Method:
    cls = METHODS[config["method"]]
    return cls(from_model(config), config["seed"], backbone, **config["hparams"])


def save_run(run: Run) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in run.method.state_dict().items()}
    atomic_write_bytes(run.path / "state.safetensors", st_save(state))
    doc = dict(run.config, format=RUN_FORMAT, format_version=RUN_FORMAT_VERSION,
               tasks=run.method.tasks, acc_matrix=run.acc_matrix,
               before_acc=run.method.before_acc, init_acc=run.method.init_acc)
    atomic_write_bytes(run.path / "run.json", (json.dumps(doc, indent=1) + "\n").encode())


def load_run(path: str | Path) -> Run:
    path = Path(path)
    cfg_path, state_path = path / "run.json", path / "state.safetensors"
    try:
        doc = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise RunError(f"{cfg_path}: missing; is {path} a run directory made by 'edgecl train'?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{cfg_path}: corrupt ({e})") from e
    if doc.get("format") != RUN_FORMAT or doc.get("format_version") != RUN_FORMAT_VERSION:
        raise RunError(f"{cfg_path}: not an edgecl run of format version {RUN_FORMAT_VERSION}")
    try:
        state = st_load(state_path.read_bytes())
    except FileNotFoundError:
        raise RunError(f"{state_path}: missing") from None
    except Exception as e:
        raise RunError(f"{state_path}: corrupt ({e})") from e
    keys = ("method", "arch", "hidden", "input_shape", "seed", "hparams", "stream")
    config = {k: doc[k] for k in keys}
    # a run of format 1 holds a layer table; read it as a graph
    config["graph"] = doc["graph"] if "graph" in doc else from_model(doc).to_dict()
    try:
        method = new_method(config)
    except (GraphError, ValueError) as e:
        raise RunError(f"{cfg_path}: {e}") from e
    try:
        method.load_state(state, doc["tasks"], doc["before_acc"], doc["init_acc"])
    except KeyError as e:
        raise RunError(f"{state_path}: lacks tensor {e.args[0]}") from None
    return Run(path, config, method, doc["acc_matrix"])


def train(data: str, method: str, out: str | Path, *, n_tasks: int | None = None, seed: int = 0,
          arch: str = "mlp", hidden: list[int] | None = None, hparams: dict | None = None,
          backbone: dict[str, np.ndarray] | None = None, graph: Graph | None = None,
          log: Callable[[str], None] = print) -> Run:
    """Learn the first ``n_tasks`` tasks of ``data`` with ``method`` into ``out``.

    The model is ``graph`` (an imported or zoo model, with its weights in ``backbone``)
    or the built-in ``arch`` (mlp, cnn). If ``out`` already holds a run of the same
    configuration, it continues from the tasks it has learned.
    """
    if method not in METHODS:
        raise RunError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    keep_freed_heap()  # each step's arrays reuse freed heap instead of faulting pages in anew
    out = Path(out)
    existing = load_run(out) if (out / "run.json").exists() else None
    if existing is not None:  # continuing: the run holds its graph and how its data was fitted
        fit = existing.config["stream"].get("fit")
        fit = (tuple(fit["shape"]), fit["dtype"]) if fit else None
    else:
        fit = None if graph is None else (graph.input_shape, graph.input.dtype)
    stream: Stream = load_stream(data, seed=seed, n_tasks=n_tasks, fit=fit)
    if existing is not None:
        run = existing
        want = {"method": method, "arch": arch, "seed": seed, "stream": stream.spec}
        have = {k: run.config[k] for k in want}
        if want != have:
            raise RunError(f"{out}: holds a run of {have}, not {want}; use another --out")
        learned = [t["name"] for t in run.tasks]
        if learned != [t.name for t in stream.tasks[: len(learned)]]:
            raise RunError(f"{out}: learned tasks {learned} are not the start of {data}")
        log(f"{out}: continuing after {len(run.tasks)} learned task(s)")
    else:
        cls = METHODS[method]
        if graph is None:
            try:
                graph = architectures.build(arch, stream.input_shape, hidden=hidden, bias=cls.uses_bias)
            except (ValueError, GraphError) as e:
                raise RunError(str(e)) from e
        config = {"method": method, "arch": arch, "hidden": hidden, "input_shape": list(graph.input_shape),
                  "graph": graph.to_dict(), "seed": seed, "hparams": dict(hparams or {}),
                  "stream": stream.spec}
        try:
            run = Run(out, config, new_method(config, backbone), [])
        except (ValueError, GraphError) as e:
            raise RunError(str(e)) from e
    for i in range(len(run.tasks), len(stream)):
        task = stream.tasks[i]
        run.method.learn(task)
        row = [run.method.accuracy(t.x_test, t.y_test, j) for j, t in enumerate(stream.tasks[: i + 1])]
        run.acc_matrix.append(row)
        save_run(run)
        log(f"[{method}] task {i + 1}/{len(stream)} {task.name}: test acc {row[-1]:.3f}; "
            f"all: {' '.join(f'{a:.3f}' for a in row)}")
    return run

"""The ``edgecl`` command line.

Device-side commands (eval, infer, inspect) import only the runtime; host commands
(train, bundle, demo) import torch when they run, never at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path


def _threads_module():
    """``edgecl.runtime.threads``, loaded without ``edgecl.runtime``'s ``__init__`` (which
    imports numpy): the thread count must be in the environment before numpy loads its BLAS."""
    name = "edgecl.runtime.threads"
    if name in sys.modules or "edgecl.runtime" in sys.modules:
        return importlib.import_module(name)
    where = importlib.util.find_spec("edgecl.runtime").submodule_search_locations
    spec = importlib.util.spec_from_file_location(name, os.path.join(list(where)[0], "threads.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_threads = _threads_module()
if "numpy" not in sys.modules:  # a fresh `edgecl` process: its own command line, now
    _threads.configure(_threads.from_argv(sys.argv[1:]))

import edgecl.runtime  # noqa: E402  (after the thread count)
from edgecl.runtime.errors import EdgeclError  # noqa: E402

from . import tables  # noqa: E402

edgecl.runtime.threads = _threads


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _widths(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of widths") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {value!r}")
    return out


def _hparams(args: argparse.Namespace) -> dict:
    hp = {}
    for key in ("epochs", "lr", "batch_size"):
        if getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise EdgeclError(f"--hp {item!r}: use NAME=VALUE, e.g. --hp density=0.3")
        try:
            hp[key.replace("-", "_")] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise EdgeclError(f"--hp {item!r}: {value!r} is not a number") from None
    return hp


def _model_source(args: argparse.Namespace):
    """(graph, weights) for --model or a zoo --arch; None for the built-in mlp/cnn."""
    source = args.model or (args.arch if args.arch not in ("mlp", "cnn") else None)
    if source is None:
        if args.mask_layers or args.features:
            raise EdgeclError("--mask-layers and --features are for --model or a zoo --arch")
        return None
    from edgecl.models.importer import ImportError_, resolve

    try:
        return resolve(source, features=args.features, mask_layers=args.mask_layers)
    except ImportError_ as e:
        raise EdgeclError(str(e)) from e


def _zoo_pretrained(name: str) -> bool:
    from edgecl.models.zoo import ZOO

    return ZOO[name].pretrained if name in ZOO else True


def cmd_train(args: argparse.Namespace) -> int:
    from edgecl.models.training import train

    backbone, graph = None, None
    model = _model_source(args)
    if model is not None:
        graph, backbone = model
        if args.model is None and not _zoo_pretrained(args.arch):
            backbone = None  # a zoo model without real weights: the method's own initialization
        if args.backbone:
            raise EdgeclError("--backbone is for the built-in mlp/cnn; an imported model brings its weights")
    elif args.backbone:
        from edgecl.runtime.safetensors_mmap import read_safetensors

        backbone, _ = read_safetensors(args.backbone, mapped=False)
    try:
        run = train(args.data, args.method, args.out, n_tasks=args.tasks, seed=args.seed,
                    arch=args.arch if model is None else (args.model or args.arch), hidden=args.hidden,
                    backbone=backbone, graph=graph, hparams=_hparams(args))
    except ValueError as e:
        raise EdgeclError(str(e)) from e
    print(f"{args.out}: {len(run.tasks)} task(s) learned with {args.method} "
          f"({', '.join(f'{k}={v}' for k, v in run.method.hp.items())})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from edgecl.models.importer import ImportError_, import_model, save_model

    try:
        graph, weights = import_model(args.source, features=args.features, input_shape=args.input_shape,
                                      input_dtype=args.input_dtype)
        if args.mask_layers:
            from edgecl.models.importer import resolve_mask

            graph = resolve_mask(graph, args.mask_layers)
    except ImportError_ as e:
        raise EdgeclError(str(e)) from e
    save_model(args.out, graph, weights, args.source)
    ops = sorted({n.op for n in graph.nodes})
    print(f"{args.out}: {args.source} -> {len(graph.nodes)} nodes ({', '.join(ops)}), "
          f"{graph.n_params:,} parameters, input {graph.input_shape} {graph.input.dtype}, "
          f"features {graph.features!r} ({graph.feature_dim}), {len(graph.mask_sites())} masked weights")
    print(f"next: edgecl train --model {args.out} --data DATA --method supsup --out RUN")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgecl.compiler.from_run import bundle_run
    from edgecl.compiler.golden import ensure_golden

    versions = bundle_run(args.run_dir, args.out)
    if versions:
        from edgecl.runtime.bundle import Bundle

        log = {e["version"]: e["parts"] for e in Bundle.open(args.out, verify=False).log}
        for v in versions:
            parts = log.get(v, [])
            tasks = [p.split(":", 1)[1] for p in parts if p.startswith("task:")]
            routers = [p.split(":", 1)[1] for p in parts if p.startswith("router:")]
            print(f"{args.out}: version {v}: task {', '.join(tasks)}"
                  + (f" with the routers brought up to it ({', '.join(routers)})" if routers else ""))
    else:
        print(f"{args.out}: already holds every task of {args.run_dir}; nothing written")
    _golden(args.out, ensure_golden)
    return 0


def _golden(bundle: str, ensure_golden) -> None:
    version = ensure_golden(bundle)
    if version is not None:
        print(f"{bundle}: version {version}: golden outputs for device_tests")


def _eval_stream(spec: dict | None, data: str, seed: int | None):
    from edgecl.models.data import load_stream

    if seed is None:
        seed = int((spec or {}).get("seed", 0)) if (spec or {}).get("data") == data else 0
    n = (spec or {}).get("n_tasks") if data == "permuted-digits" else None
    return load_stream(data, seed=seed, n_tasks=n)


def _print_routing(r: dict) -> None:
    rows = []
    for name, v in r["routers"].items():
        fb = v["fallback"]
        unk = " ".join(f"{k}={p:.2f}" for k, p in fb["unknown_rate"].items())
        rows.append([name + (" *" if name == r.get("default_router") else ""),
                     f"{v['task_id_acc']:.4f}", f"{v['class_il_acc']:.4f}",
                     f"{fb['known_rejected_rate']:.3f}", unk or "-", f"{fb['decision_acc']:.4f}",
                     "-" if "router_overhead" not in v else f"{100 * v['router_overhead']:.0f}%"])
    print(tables.render(["router (* default)", "task-ID acc", "class-IL acc", "known → unknown",
                         "unknown → unknown", "decision acc", "time / inference (b=1)"], rows))


def _fmt(v: object) -> object:
    return f"{v:.4f}" if isinstance(v, float) else v


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.evaluate import evaluate
    from edgecl.runtime.evaluate_routing import evaluate_routing

    bundle = Bundle.open(args.bundle)
    stream = _eval_stream(bundle.manifest.get("stream"), args.data, args.seed)
    data = [(t.name, t.x_test, t.y_test) for t in stream.tasks]
    result = evaluate(args.bundle, data)
    print(tables.acc_matrix(result["tasks"], result["acc_matrix"]))
    fwt = "-" if result["fwt"] is None else f"{result['fwt']:+.4f}"
    bwt = "-" if result["bwt"] is None else f"{result['bwt']:+.4f}"
    print(f"ACC {result['acc']:.4f}   BWT {bwt}   FWT {fwt}")
    own = sorted({k for p in result["per_task"] for k in p["method_metrics"]})
    if own:  # figures a method records per task (importance drift, damped scores, ...)
        print(tables.render(["task", *own], [[p["name"], *(_fmt(p["method_metrics"].get(k)) for k in own)]
                                             for p in result["per_task"]]))
    if result["fwt"] is None and result["fwt_missing"]:
        print(f"FWT not defined: {', '.join(result['fwt_missing'])} has no accuracy measured before it "
              "was learned and at initialization (learned on the device, or by a method that records none)")
    print(tables.render(
        ["task", "method", "acc", "mask bits/weight", "bits/weight (with head)", "bytes"],
        [[p["name"], p["method"], f"{p['acc']:.3f}", f"{p['mask_bits_per_weight']:.4f}",
          f"{p['bits_per_weight']:.4f}", p["bytes"]] for p in result["per_task"]]))
    for m in result["merged"]:  # task arithmetic: one model for its sources, no task id
        print(f"merged task {m['name']}: acc {m['acc']:.4f} on its sources' {m['samples']} test samples "
              f"together, no task id ({', '.join(m['sources'])})")
    if bundle.manifest.get("routers"):
        noise = np.random.default_rng(0).random((500, *stream.input_shape), dtype=np.float32)
        unknown = [("noise", noise)] + [(f"held-out {t.name}", t.x_test) for t in stream.tasks
                                        if t.name not in bundle.task_names]
        routing = evaluate_routing(args.bundle, data, unknown, threshold=args.threshold)
        result.update(routing)
        print("\nTask-ID routing (no task given):")
        _print_routing(routing)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from edgecl.runtime import Session

    try:
        x = np.load(args.input, allow_pickle=False)
    except FileNotFoundError:
        raise EdgeclError(f"{args.input}: no such file") from None
    except Exception as e:
        raise EdgeclError(f"{args.input}: not a readable .npy array ({e})") from e
    providers = args.backend.split(",") if args.backend else None
    try:
        s = Session(args.bundle, providers=providers, router=args.router)
    except ValueError as e:
        raise EdgeclError(str(e)) from e
    shape = s.input_shape
    reshaped = None
    if x.ndim >= 2 and x.shape[1:] != shape and x.shape != shape \
            and int(np.prod(x.shape[1:])) == int(np.prod(shape)):
        # the documented rule (--input's help): a batch whose samples hold the model's number of
        # values is read in C order as the model's input shape, e.g. 8x8 images for a 64-input MLP
        reshaped = x.shape
        x = x.reshape(len(x), *shape)
        if not args.json:
            print(f"input {reshaped} read as {x.shape} (same values per sample, C order)", file=sys.stderr)
    if args.task is None:
        return _infer_routed(s, x, args)
    logits = s.logits(x, args.task)
    info = s.bundle.task(args.task)
    labels = np.asarray(info["classes"])[logits.argmax(axis=1)]
    if args.json:
        print(json.dumps({"task": info["name"], "provider": s.provider, "predictions": labels.tolist(),
                          "logits": logits.tolist()}))
    else:
        print(f"task {info['name']}: {len(labels)} prediction(s)")
        print(" ".join(map(str, labels.tolist())))
    return 0


def _infer_routed(s, x, args: argparse.Namespace) -> int:
    """No task given: the router picks one per input, or says unknown and why."""
    r = s.run(x, threshold=args.threshold, fallback=args.fallback)
    out = r.as_dicts()
    if args.json:
        print(json.dumps({"router": r.router, "threshold": r.threshold, "provider": s.provider,
                          "confidence_of": "the router's probability of the chosen task",
                          "inputs": [dict(o, task=o["task"] or "unknown") for o in out]}))
    else:
        print(f"router {r.router} (threshold {r.threshold}; confidence = the router's probability of "
              f"the task it chose): {len(out)} input(s)")
        for i, o in enumerate(out):
            why = "" if o["reason"] == "ok" else f"  ({o['reason']}; closest task {o['best_task']})"
            print(f"{i}: task {o['task'] or 'unknown'}  confidence {o['confidence']:.3f}  "
                  f"prediction {'-' if o['prediction'] is None else o['prediction']}{why}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle import Bundle

    b = Bundle.open(args.bundle)
    m = b.manifest
    print(f"bundle {args.bundle}: format {m['format']} v{m['format_version']}, version {b.version} "
          f"(versions on disk: {', '.join(map(str, b.versions()))}), edgecl {m.get('edgecl_version')}")
    from edgecl import kernels

    print(f"kernels: {kernels.status()}")
    print(f"threads: {_threads.describe()}")
    model, graph = b.model, b.graph
    ops: dict[str, int] = {}
    for n in graph.backbone_nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    print(f"model: {model['arch']}, input {tuple(model['input_shape'])} {graph.input.dtype}, "
          f"{len(graph.backbone_nodes)} nodes, {graph.n_params:,} parameters, "
          f"{graph.n_weights:,} masked weights, {graph.feature_dim} features at {graph.features!r}"
          + ("" if "graph" in model else " (format-1 layer table, read as a graph)"))
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    print(f"graphs: {', '.join(sorted(m['graphs']))}; backbones: "
          + ", ".join(f"{n} ({e['file']}, graph {e['graph']})" for n, e in sorted(m["backbones"].items())))
    sig = m.get("signature")
    signed = f"key {sig['key']} (check: edgecl verify --trust-store DIR)" if sig else "none"
    print(f"signature: {signed}; bundle id {m.get('bundle_id', '- (format 1)')}")
    for method, hp in sorted({t["method"]: t.get("hparams") for t in b.tasks if t.get("hparams")}.items()):
        print(f"{method} trained with: {', '.join(f'{k}={v}' for k, v in hp.items())}")
    print(tables.render(["masked node", "op", "weight", "shape"],
                        [[s.node, s.op, s.weight, tuple(s.shape)] for s in graph.mask_sites()]))
    print()
    # where a task runs: its graph and backbone (a grown graph, a spawned model), and what
    # it takes parts from (depends)
    print(tables.render(
        ["#", "task", "method", "kind", "rev", "graph", "backbone", "depends", "classes", "mask bits/weight",
         "bytes", "host acc"],
        [[t["index"], t["name"], t["method"], t["kind"], t.get("revision", 1), t.get("graph", "main"),
          t.get("backbone", "main"), ",".join(str(b.task(d)["index"]) for d in t.get("depends", [])) or "-",
          t["classes"], f"{t['storage']['mask_bits_per_weight']:.4f}", t["storage"]["file_bytes"],
          f"{t['metrics'].get('host_acc', float('nan')):.3f}"] for t in b.tasks]))
    print()
    print(tables.render(["file", "bytes", "sha256"],
                        [[rel, f["bytes"], f["sha256"]] for rel, f in sorted(m["files"].items())]))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from edgecl.compiler.onnx_export import export_bundle
    from edgecl.compiler.tvm_build import compile_bundle
    from edgecl.runtime.bundle import Bundle

    try:
        version = compile_bundle(args.bundle, args.target, args.tune, train=not args.no_train_step)
    except (ValueError, RuntimeError, OSError) as e:
        raise EdgeclError(f"compile {args.bundle} for {args.target}: {e}") from e
    entry = Bundle.open(args.bundle).manifest["targets"][args.target]
    step = entry.get("train_step") or {}
    print(f"{args.bundle}: version {version}: {args.target} -> {entry['file']} "
          f"(TVM {entry['tvm_version']}, {'tuned' if entry['tuned'] else 'default schedule'}"
          f"{', training step ' + step['file'] if step.get('file') else ''})")
    from edgecl.compiler import tflite_export
    from edgecl.compiler.golden import ensure_golden

    exports = Bundle.open(args.bundle).manifest.get("exports", {})
    if not exports.get("onnx"):
        print(f"{args.bundle}: version {export_bundle(args.bundle)}: ONNX graphs for onnxruntime")
    if not exports.get("tflite"):
        version = tflite_export.export_bundle(args.bundle)
        why = Bundle.open(args.bundle).manifest["exports"]["tflite"].get("unavailable")
        what = f"no TFLite models ({why})" if why else "TFLite models"
        print(f"{args.bundle}: version {version}: {what}")
    _golden(args.bundle, ensure_golden)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bundle == "kernels":
        from .bench_kernels import run_kernel_bench

        run_kernel_bench(args.json)
        return 0
    if args.bundle == "learn":
        from .bench_learn import run_from_args

        return run_from_args(args)
    if args.bundle == "open":
        from .bench_open import main as bench_open

        return bench_open(args)
    if args.bundle == "daemon":
        from .bench_daemon import main as bench_daemon

        return bench_daemon(args)
    if args.bundle == "fleet":
        from .bench_fleet import main as bench_fleet

        return bench_fleet(args)
    if args.bundle == "methods":
        from .bench_methods import main as bench_methods

        return bench_methods(args)
    from . import bench

    if not Path(args.bundle).exists():
        raise EdgeclError(f"{args.bundle}: no such bundle "
                          "(or say zoo, kernels, learn, open, daemon, fleet or methods)")
    return bench.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from edgecl.models.methods import METHODS

    from .demo import run_demo

    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EdgeclError(f"edgecl demo: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return run_demo(Path(args.out), methods=methods, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecl", description=__doc__.splitlines()[0] if __doc__ else "")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="learn a task stream on the host into a run directory")
    t.add_argument("--data", required=True,
                   help="split-digits, permuted-digits, or PATH.npz (arrays x, y, optional task)")
    # no argparse choices: the methods' registry imports torch, which start-up must not
    t.add_argument("--method", required=True,
                   help="a method of the README's table (packnet, supsup, piggyback, hat, tss, epi, "
                        "hashing, ...); an unknown name is refused with the list")
    t.add_argument("--out", required=True, help="run directory (an existing one is continued)")
    t.add_argument("--tasks", type=_positive, help="learn only the first N tasks of the stream")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", default="mlp",
                   help="mlp, cnn, or a zoo model: ds-cnn, resnet8, mobilenet-v1-0.25, fc-autoencoder, "
                        "mobilenet-v2, efficientnet-lite0, minilm (default mlp)")
    t.add_argument("--model", help="your model: a directory from 'edgecl import', a .onnx, a .pt2, or "
                                   "package.module:factory")
    t.add_argument("--features", help="with --model/zoo: the value or module where task heads attach "
                                      "(default: the input of the last Linear)")
    t.add_argument("--mask-layers", type=lambda v: v.split(","),
                   help="with --model/zoo: the nodes (or weights) tasks mask, comma-separated "
                        "(default: every Conv and Linear)")
    t.add_argument("--hidden", type=_widths,
                   help="widths, e.g. 256,256 (mlp) or 16,32,128 (cnn: channels..., linear)")
    t.add_argument("--backbone", help="piggyback: a trained backbone (.safetensors) to mask")
    t.add_argument("--epochs", type=_positive)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=_positive)
    t.add_argument("--hp", action="append", metavar="NAME=VALUE",
                   help="a method hyperparameter, e.g. density=0.3 (supsup), prune=0.5 (packnet)")
    t.set_defaults(func=cmd_train)

    im = sub.add_parser("import", help="import your model (PyTorch or ONNX) as an edgecl model directory")
    im.add_argument("source", help="a zoo name, model.onnx, a saved ExportedProgram .pt2, or "
                                   "package.module:factory (returns an nn.Module)")
    im.add_argument("--out", required=True, help="model directory to write (graph.json, weights)")
    im.add_argument("--features", help="value or module where task heads attach "
                                       "(default: the input of the last Linear)")
    im.add_argument("--input-shape", type=_widths, help="for package.module:factory: the input shape "
                                                         "without the batch axis, e.g. 3,96,96")
    im.add_argument("--input-dtype", choices=["float32", "int64"], default="float32")
    im.add_argument("--mask-layers", type=lambda v: v.split(","),
                    help="the nodes (or weights) tasks mask (default: every Conv and Linear)")
    im.set_defaults(func=cmd_import)

    b = sub.add_parser("bundle", help="write a run's tasks into a bundle (new version per task)")
    b.add_argument("run_dir")
    b.add_argument("--out", required=True, help="bundle directory (an existing one is extended)")
    b.set_defaults(func=cmd_bundle)

    e = sub.add_parser("eval", help="accuracy matrix, ACC/BWT/FWT and storage via the runtime")
    e.add_argument("bundle")
    e.add_argument("--data", required=True, help="split-digits, permuted-digits or PATH.npz")
    e.add_argument("--seed", type=int, help="split seed (default: the one the bundle was trained on)")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--threshold", type=float, default=0.5,
                   help="routers: confidence below which an input is unknown (default 0.5)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("infer", help="predict with one task of a bundle")
    i.add_argument("bundle")
    i.add_argument("--task", help="task name or index (default: the router picks one per input)")
    i.add_argument("--router", help="router to use without --task (default: the bundle's)")
    i.add_argument("--threshold", type=float, default=0.5,
                   help="confidence below which an input is reported unknown (default 0.5)")
    i.add_argument("--fallback", help="task to use for unknown inputs instead of 'unknown'")
    i.add_argument("--input", required=True,
                   help=".npy array: a batch of inputs [N, *input shape]; a batch whose samples hold as many "
                        "values as the input (e.g. [N, 8, 8] for a 64-input MLP) is read in C order as "
                        "[N, *input shape]; any other shape is refused")
    i.add_argument("--json", action="store_true", help="print predictions and logits as JSON")
    i.add_argument("--backend", help="providers to try in order, e.g. onnxruntime,numpy "
                                     "(default: the fastest available)")
    i.set_defaults(func=cmd_infer)

    s = sub.add_parser("inspect", help="a bundle's tasks, sizes, hashes and methods")
    s.add_argument("bundle")
    s.set_defaults(func=cmd_inspect)

    c = sub.add_parser("compile", help="add a TVM library for a target (and the ONNX graphs)")
    c.add_argument("bundle")
    c.add_argument("--target", required=True, choices=["host", "rpi4", "rpi5", "jetson-orin"])
    c.add_argument("--tune", type=int, default=0, metavar="N",
                   help="try up to N schedules on the host (results cached per architecture)")
    c.add_argument("--no-train-step", action="store_true",
                   help="skip the compiled training step (edgecl learn then runs its numpy step)")
    c.set_defaults(func=cmd_compile)

    from . import bench

    k = sub.add_parser("bench", help="benchmark backends and peers side by side; 'edgecl bench zoo': "
                                     "every zoo model; 'edgecl bench kernels': the C kernels against "
                                     "numpy; 'edgecl bench learn': the device learner against PyTorch; "
                                     "'edgecl bench methods': every method on one stream")
    bench.add_arguments(k)
    from .bench_learn import add_zoo_arguments

    add_zoo_arguments(k)  # edgecl bench learn --zoo ds-cnn,mobilenet-v2
    from .bench_open import add_arguments as add_open_arguments

    add_open_arguments(k)  # edgecl bench open --zoo-model minilm
    from .bench_daemon import add_arguments as add_daemon_arguments

    add_daemon_arguments(k)  # edgecl bench daemon
    from .bench_fleet import add_arguments as add_fleet_arguments

    add_fleet_arguments(k)  # edgecl bench fleet
    from .bench_methods import add_arguments as add_methods_arguments

    add_methods_arguments(k)  # edgecl bench methods
    k.set_defaults(func=bench.zoo_or(cmd_bench))  # edgecl bench zoo: tools/bench_zoo.py

    from . import deploy, device_test_cmd, learn_cmd

    lp = sub.add_parser("learn", help="learn a new task on the device (numpy + C kernels, no torch) "
                                      "under a RAM and an energy budget")
    learn_cmd.add_arguments(lp)
    lp.set_defaults(func=learn_cmd.main)

    dp = sub.add_parser("deploy", help="install a bundle and the runtime on a Pi or a Jetson over ssh")
    deploy.add_arguments(dp)
    dp.set_defaults(func=deploy.main)

    tp = sub.add_parser("device-test", help="run device_tests on a deployed device; results as JSON")
    device_test_cmd.add_arguments(tp)
    tp.set_defaults(func=device_test_cmd.main)

    from . import bundle_cmd, daemon_cmd, fleet_cmd, keys_cmd, merge_cmd, pack_cmd

    bundle_cmd.add_parser(sub)
    keys_cmd.add_parser(sub)
    pack_cmd.add_parser(sub)
    merge_cmd.add_parser(sub)
    daemon_cmd.add_parser(sub)
    fleet_cmd.add_parser(sub)
    for name in ("bundle", "compile", "learn", "daemon"):  # signing key for commits and rollbacks
        bundle_cmd.add_key_argument(sub.choices[name])
    for name in ("infer", "inspect", "eval", "learn", "bench", "device-test", "daemon"):
        bundle_cmd.add_trust_argument(sub.choices[name])

    d = sub.add_parser("demo", help="train, bundle and evaluate every method on Split-Digits")
    d.add_argument("--out", default="demo-out", help="where runs and bundles go")
    d.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    # --threads before or after the command (`edgecl --threads 1 inspect B`, `edgecl inspect
    # B --threads 1`); a subcommand's copy defaults to SUPPRESS so it never hides the global one.
    threads_help = ("threads for torch, BLAS, OpenMP and TVM (default: the cores not busy; "
                    "see docs/development.md)")
    p.add_argument("--threads", type=_positive, metavar="N", help=threads_help)
    for command in sub.choices.values():
        command.add_argument("--threads", type=_positive, metavar="N", default=argparse.SUPPRESS,
                             help=threads_help)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # --key and --trust-store reach every commit and every open of the command through the
    # environment, as a service's EDGECL_SIGNING_KEY / EDGECL_TRUST_STORE would
    saved = {v: os.environ.get(v) for v in ("EDGECL_SIGNING_KEY", "EDGECL_TRUST_STORE")}
    if getattr(args, "key", None) and args.command != "keygen":
        os.environ["EDGECL_SIGNING_KEY"] = str(Path(args.key).resolve())
    if getattr(args, "trust_store", None):
        os.environ["EDGECL_TRUST_STORE"] = str(Path(args.trust_store).resolve())
    try:
        with _threads.configured(args.threads):
            return args.func(args)
    except EdgeclError as e:
        print(f"edgecl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgecl {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgecl inspect B | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


if __name__ == "__main__":
    sys.exit(main())

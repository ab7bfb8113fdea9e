"""Task kinds: every kind round-trips through a bundle (host, and a device process without
torch), materializes what its spec says, owns what it should, and a corrupt tensor of each
kind is refused naming the file and the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Bundle, BundleError
from edgecl.runtime.bundle_write import Transaction
from edgecl.runtime.graph import Graph, Node, Param, Value, model_entry
from edgecl.runtime.kinds import KINDS, get_kind, hash_mask, hash_params
from edgecl.runtime.masks import pack_bits
from edgecl.runtime.session import Runtime, activate, owned_union

from .device_process import run_on_device

RNG = np.random.default_rng(7)


def _main_graph() -> Graph:
    params = [Param("fc1.weight", (24, 12), "weight"), Param("fc1.bias", (24,), "bias"),
              Param("fc2.weight", (16, 24), "weight"), Param("fc2.bias", (16,), "bias")]
    nodes = [Node("fc1", "Linear", ("x", "fc1.weight", "fc1.bias"), ("h1",)),
             Node("relu1", "Relu", ("h1",), ("r1",)),
             Node("fc2", "Linear", ("r1", "fc2.weight", "fc2.bias"), ("h2",)),
             Node("relu2", "Relu", ("h2",), ("r2",))]
    return Graph([Value("x", (12,))], params, nodes, "r2", name="mlp")


def _adapter_graph(main: Graph) -> Graph:
    """The main graph with a residual adapter after relu2 (a task's own module)."""
    params = [*main.params.values(), Param("adapter.weight", (16, 16), "weight"),
              Param("adapter.bias", (16,), "bias")]
    nodes = [*main.nodes, Node("adapter", "Linear", ("r2", "adapter.weight", "adapter.bias"), ("a",)),
             Node("res", "Add", ("r2", "a"), ("out",))]
    return Graph([Value("x", (12,))], params, nodes, "out", name="mlp-adapter",
                 mask=[s.weight for s in main.mask_sites()])


def _f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _head(n: int = 3, feat: int = 16) -> dict[str, np.ndarray]:
    return {"head.weight": _f32(n, feat), "head.bias": _f32(n)}


def _parts(kind: str, g: Graph) -> tuple[dict, dict]:
    """(entry extras, tensors) of one task of ``kind`` on the main graph."""
    sites = g.mask_sites()
    if kind == "weight_bits":
        return {}, get_kind(kind).encode({f"mask.{s.node}": RNG.random(s.shape) < 0.5 for s in sites}, g)
    if kind == "unit_gates":
        return {}, {f"gate.{s.node}": (RNG.random(s.units) < 0.5).astype(np.uint8) for s in sites}
    if kind == "soft_mask":
        soft = {f"soft.{s.node}": RNG.random(s.shape) * (RNG.random(s.shape) < 0.6) for s in sites}
        return {}, get_kind(kind).encode(soft, g)
    if kind == "hashed":
        return {}, {f"hash.{s.node}": hash_params(100 + i, 0.3) for i, s in enumerate(sites)}
    if kind == "hash_chain":
        rows = np.array([[100, 2**31], [200, 2**30]], np.uint32)
        return {}, {"chain.mode": np.array([0], np.uint8), **{f"chain.{s.node}": rows for s in sites}}
    if kind == "lora":
        s = sites[1]
        return {}, {f"lora.{s.node}.a": _f32(2, 24), f"lora.{s.node}.b": _f32(16, 2),
                    "lora.scale": np.array([0.5], np.float32)}
    if kind == "modules":
        return {"graph": "adapter"}, {"param.adapter.weight": _f32(16, 16) * 0.1,
                                      "param.adapter.bias": _f32(16)}
    if kind == "merged":
        return {"depends": ["t-weight_bits", "t-lora"]}, {"merge.scale": np.array([0.3, 0.7], np.float32)}
    raise AssertionError(kind)


ORDER = ["weight_bits", "unit_gates", "soft_mask", "hashed", "hash_chain", "lora", "modules", "merged"]


@pytest.fixture(scope="module")
def kinds_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinds") / "bundle"
    g = _main_graph()
    backbone = {p.name: _f32(*p.shape) for p in g.params.values()}
    with Transaction(root, key=None) as tx:
        tx.add_graph("main", model_entry(g, "mlp"))
        tx.add_graph("adapter", model_entry(_adapter_graph(g), "mlp-adapter"))
        tx.add_backbone("main", backbone)
        for kind in ORDER:
            extra, tensors = _parts(kind, g)
            tx.add_task({"name": f"t-{kind}", "kind": kind, "classes": [0, 1, 2], "n_classes": 3,
                         "method": "test", "metrics": {}, **extra}, {**tensors, **_head()})
    return root


def test_every_kind_is_registered_and_tested():
    assert sorted(KINDS) == sorted(ORDER)


def _expected(b: Bundle, kind: str) -> dict[str, np.ndarray]:
    """Each kind's spec (docs/bundle.md), written out independently of its class."""
    bb, t, g = b.backbone, b.task_tensors(f"t-{kind}"), b.graph
    out = {}
    for s in g.mask_sites():
        w = np.asarray(bb[s.weight])
        n = s.node
        if kind == "weight_bits":
            keep = np.unpackbits(t[f"mask.{n}"], bitorder="little")[: w.size].reshape(w.shape) == 1
            out[s.weight] = np.where(keep, w, np.float32(0))
        elif kind == "unit_gates":
            out[s.weight] = np.where(t[f"gate.{n}"][:, None] == 1, w, np.float32(0))
            out[s.bias] = np.where(t[f"gate.{n}"] == 1, bb[s.bias], np.float32(0))
        elif kind == "soft_mask":
            m = t[f"soft.{n}"].astype(np.float32)
            out[s.weight] = np.where(m > 0, w * m, np.float32(0))
        elif kind == "hashed":
            seed, thr = (int(v) for v in t[f"hash.{n}"])
            idx = np.arange(w.size, dtype=np.uint64)
            h = (idx * 0x9E3779B1 + seed) & 0xFFFFFFFF
            h ^= h >> 16
            h = (h * 0x85EBCA6B) & 0xFFFFFFFF
            h ^= h >> 13
            h = (h * 0xC2B2AE35) & 0xFFFFFFFF
            h ^= h >> 16
            out[s.weight] = np.where((h < thr).reshape(w.shape), w, np.float32(0))
        elif kind == "hash_chain":  # mode 0: the union of every row's picks
            keep = np.zeros(w.size, dtype=bool)
            for seed, thr in t[f"chain.{n}"]:
                keep |= hash_mask(w.size, int(seed), int(thr))
            out[s.weight] = np.where(keep.reshape(w.shape), w, np.float32(0))
        elif kind == "lora" and f"lora.{n}.a" in t:
            out[s.weight] = w + t["lora.scale"][0] * (t[f"lora.{n}.b"] @ t[f"lora.{n}.a"])
    if kind == "modules":
        out = {"adapter.weight": t["param.adapter.weight"], "adapter.bias": t["param.adapter.bias"]}
    if kind == "merged":
        p1, p2 = _expected(b, "weight_bits"), _expected(b, "lora")
        for name in sorted(set(p1) | set(p2)):
            w = np.asarray(bb[name])
            out[name] = (w + 0.3 * (p1.get(name, w) - w)) + 0.7 * (p2.get(name, w) - w)
    return out


@pytest.mark.parametrize("kind", ORDER)
def test_kind_materializes_its_spec(kinds_bundle, kind):
    b = Bundle.open(kinds_bundle)
    active = activate(b, f"t-{kind}")
    for name, want in _expected(b, kind).items():
        got = active.params[name]
        if kind in ("lora", "merged"):  # float sums in another order: equal to rounding
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert got.tobytes() == np.ascontiguousarray(want, np.float32).tobytes(), name
    info = b.task(f"t-{kind}")
    assert info["storage"]["file_bytes"] == b.manifest["files"][info["file"]]["bytes"]


def test_hash_mask_is_the_documented_hash_and_its_density():
    keep = hash_mask(100_000, 12345, int(hash_params(12345, 0.25)[1]))
    assert abs(keep.mean() - 0.25) < 0.01
    assert not np.array_equal(keep, hash_mask(100_000, 12346, int(hash_params(12345, 0.25)[1])))


def test_storage_accounting_per_kind(kinds_bundle):
    b = Bundle.open(kinds_bundle)
    st = {k: b.task(f"t-{k}")["storage"] for k in ORDER}
    n = b.graph.n_weights
    sites = b.graph.mask_sites()
    assert st["weight_bits"]["mask_bytes"] == sum((np.prod(s.shape) + 7) // 8 for s in sites)
    assert st["hashed"]["mask_bytes"] == 8 * len(b.graph.mask_sites())  # a seed and a threshold per site
    assert st["soft_mask"]["mask_bits_per_weight"] == pytest.approx(16.0)
    bits = st["weight_bits"]
    assert bits["mask_bits_per_weight"] == pytest.approx(8.0 * bits["mask_bytes"] / n)


def test_owned_entries_per_kind(kinds_bundle):
    b = Bundle.open(kinds_bundle)
    from edgecl.runtime.session import task_view

    k, v = task_view(b, "t-weight_bits")
    own = k.owned(v)["fc1.weight"]
    keep = np.unpackbits(v.tensors["mask.fc1"], bitorder="little")[: own.size] == 1
    assert np.array_equal(own, keep)
    k, v = task_view(b, "t-unit_gates")
    assert np.array_equal(k.owned(v)["fc1.bias"], v.tensors["gate.fc1"] == 1)
    for kind in ("lora", "modules", "merged"):  # they read the whole backbone
        k, v = task_view(b, f"t-{kind}")
        assert all(o is None for o in k.owned(v).values())
    union = owned_union(b)
    assert union["fc1.weight"] is None  # a LoRA task owns everything: nothing is free


def test_every_kind_round_trips_on_a_device_without_torch(kinds_bundle, tmp_path):
    x = RNG.random((5, 12), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = """
        import json, sys
        import numpy as np
        from edgecl.runtime import Bundle, Runtime
        rt = Runtime(Bundle.open(sys.argv[1]))
        x = np.load(sys.argv[2])
        print(json.dumps({t: rt.logits(x, t).tobytes().hex() for t in rt.tasks}))
        assert "torch" not in sys.modules
    """
    r = run_on_device(tmp_path, code, str(kinds_bundle), str(tmp_path / "x.npy"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    rt = Runtime(kinds_bundle)
    assert sorted(got) == sorted(f"t-{k}" for k in ORDER)
    for t in rt.tasks:
        assert bytes.fromhex(got[t]) == rt.logits(x, t).tobytes(), t


def test_a_task_on_its_own_graph_runs_its_modules(kinds_bundle):
    b = Bundle.open(kinds_bundle)
    assert b.task_graph("t-modules").name == "mlp-adapter"
    rt = Runtime(b)
    x = RNG.random((4, 12), dtype=np.float32)
    a = activate(b, "t-modules")
    r2 = np.maximum(np.maximum(x @ b.backbone["fc1.weight"].T + b.backbone["fc1.bias"], 0)
                    @ b.backbone["fc2.weight"].T + b.backbone["fc2.bias"], 0)
    feat = r2 + (r2 @ a.params["adapter.weight"].T + a.params["adapter.bias"])
    want = feat @ a.head[0].T + a.head[1]
    np.testing.assert_allclose(rt.logits(x, "t-modules"), want, rtol=1e-5, atol=1e-5)


# -- corrupt tensors of each kind ------------------------------------------------------------
CORRUPT = [
    ("weight_bits", "mask.fc1", lambda t: t.astype(np.int8), "int8"),
    ("weight_bits", "mask.fc2", lambda t: t[:-1], "shape"),
    ("unit_gates", "gate.fc1", lambda t: t.astype(np.float32), "float32"),
    ("unit_gates", "gate.fc2", lambda t: np.where(t == 0, 2, t).astype(np.uint8), "0 or 1"),
    ("soft_mask", "soft.fc1", lambda t: t.astype(np.float32), "float32"),
    ("soft_mask", "soft.fc2", lambda t: (t.astype(np.float32) + 0.75).astype(np.float16), "[0, 1]"),
    ("soft_mask", "soft.fc1", lambda t: np.full_like(t, np.nan), "[0, 1]"),
    ("hashed", "hash.fc1", lambda t: t[:1], "shape"),
    ("hash_chain", "chain.fc1", lambda t: t[:, :1], "shape"),
    ("lora", "lora.fc2.b", lambda t: t[:, :1], "shape"),
    ("lora", "lora.scale", lambda t: np.array([np.inf], np.float32), "infinite"),
    ("modules", "param.adapter.weight", lambda t: t.reshape(-1), "shape"),
    ("merged", "merge.scale", lambda t: t[:1], "shape"),
    ("weight_bits", "head.weight", lambda t: t[:, :-1], "shape"),
]


@pytest.mark.parametrize("kind,tensor,damage,says", CORRUPT,
                         ids=[f"{k}-{t}-{s}" for k, t, _, s in CORRUPT])
def test_a_corrupt_tensor_is_refused_naming_file_and_tensor(kinds_bundle, tmp_path, kind, tensor, damage,
                                                            says):
    """The bundle re-committed with one damaged tensor (valid hashes: the writer's own
    check is bypassed, as a buggy or hostile producer would): refused on activation."""
    import shutil

    from safetensors.numpy import save

    root = tmp_path / "b"
    shutil.copytree(kinds_bundle, root)
    b = Bundle.open(root)
    info = b.task(f"t-{kind}")
    tensors = dict(b.task_tensors(info["name"]))
    tensors[tensor] = damage(np.asarray(tensors[tensor]))
    (root / info["file"]).write_bytes(save(tensors))
    with pytest.raises(BundleError) as e:
        activate(Bundle.open(root, verify=False), info["name"])
    msg = str(e.value)
    assert info["file"] in msg and repr(tensor) in msg and says in msg, msg
    # the writer refuses it too, before anything is written
    with pytest.raises(BundleError) as e, Transaction(root, key=None) as tx:
        tx.add_task(dict(info, name="again"), tensors)
    assert repr(tensor) in str(e.value)


def test_unknown_kind_and_missing_dependency_are_refused(kinds_bundle, tmp_path):
    with pytest.raises(KeyError, match="unknown task kind 'sparse'"), \
            Transaction(tmp_path / "x", key=None) as tx:
        tx.add_task({"name": "a", "kind": "sparse"}, {})
    with pytest.raises(BundleError, match="depends on 'nope'"), Transaction(kinds_bundle, key=None) as tx:
        tx.add_task({"name": "m2", "kind": "merged", "classes": [0, 1, 2], "n_classes": 3, "method": "t",
                     "metrics": {}, "depends": ["nope"]}, {"merge.scale": np.ones(1, np.float32), **_head()})
    assert Bundle.open(kinds_bundle).version == 1  # nothing was written


def test_a_bit_mask_from_the_method_encoder_equals_pack_bits():
    g = _main_graph()
    s = g.mask_sites()[0]
    m = RNG.random(s.shape) < 0.3
    encoded = get_kind("weight_bits").encode({f"mask.{s.node}": m}, g)
    assert np.array_equal(encoded[f"mask.{s.node}"], pack_bits(m))


def test_a_task_names_its_backbone(kinds_bundle, tmp_path):
    """Two backbones of one graph (a spawned model, say): each task runs on its own, and
    what one backbone's tasks own does not constrain the other."""
    import shutil

    root = tmp_path / "b"
    shutil.copytree(kinds_bundle, root)
    g = Bundle.open(root).graph
    second = {p.name: _f32(*p.shape) for p in g.params.values()}
    extra, tensors = _parts("weight_bits", g)
    with Transaction(root, key=None) as tx:
        tx.add_backbone("spawn-1", second, graph="main")
        tx.add_task({"name": "on-spawn", "kind": "weight_bits", "classes": [0, 1, 2], "n_classes": 3,
                     "method": "test", "metrics": {}, "backbone": "spawn-1"}, {**tensors, **_head()})
    b = Bundle.open(root)
    a = activate(b, "on-spawn")
    keep = np.unpackbits(tensors["mask.fc1"], bitorder="little")[: 24 * 12].reshape(24, 12) == 1
    assert a.params["fc1.weight"].tobytes() == np.where(keep, second["fc1.weight"], np.float32(0)).tobytes()
    assert a.params["fc1.bias"].tobytes() == second["fc1.bias"].tobytes()
    assert np.array_equal(owned_union(b, "spawn-1")["fc1.weight"], keep.reshape(-1))
    assert owned_union(b)["fc1.weight"] is None  # the main backbone: its LoRA task owns it all
    x = RNG.random((3, 12), dtype=np.float32)
    want = Runtime(kinds_bundle).logits(x, "t-weight_bits").tobytes()
    assert Runtime(b).logits(x, "t-weight_bits").tobytes() == want


def test_every_kind_can_take_a_new_head_on_the_device():
    """The learner's hook: ``head`` learns a head on any task's parameters; only weight bits
    are also made by the mask learners."""
    assert all("head" in k.learners for k in KINDS.values())
    assert {n for n, k in KINDS.items() if "supsup" in k.learners} == {"weight_bits"}

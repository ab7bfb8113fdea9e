"""The RAM planner: the bytes a learning run needs, and a batch size that fits.

It reads the model graph only: the mask sites (``graph.mask_sites()``), the value shapes
(``graph.shapes(batch)``) and the graph's structure — no op switch, and no switch on the
learning method either: what a method holds is its :class:`.methods.LearnMethod`'s terms
(``plan_sites`` — by default from ``plan_state_bytes`` and ``plan_grad_bytes`` —,
``plan_weights``, ``trains_sites``).
Everything is float32 (4 bytes; an int64 input 8). With ``n_l`` the weights of mask site
l, ``T`` the trained sites (supsup: every site, or the last K; packnet: those with a free
weight; head: none), ``F`` the feature width, ``C`` the new task's classes, ``B`` the
batch, ``N`` the samples, the learning child holds:

    weights     = backbone file bytes (mapped, paged in as read)
                  + 4 * sum_{l in T} n_l          (materialized supermask / trainable copies)
                  + packnet: 4 * sum_{l not in T} n_l (frozen sites under the old union)
                             + backbone file bytes    (the new backbone, serialized)
                  + (sum_l n_l / 8 + 1) * (tasks + 2)  (packed masks: old, free, new)
    trainable   = supsup: 4 * sum_{l in T} n_l (scores);  lora: 4 * k (A, B);  else 0
    gradients   = 4 * sum_{l in T} n_l            (dL/dW_eff of trained sites only)
                  + supsup: 4 * sum_{l in T} n_l  (the straight-through score gradients)
                  + lora: 4 * k + 4 * sum_{l in T} n_l  (the pair's, the B @ A product)
    optimizer   = 2 * 4 * sum_{l in T} n_l        (Adam m and v)
                  lora: 8 * k + k / 8 + 2 * |T|   (Adam m and v, all-bits of A and B)
                  with k = sum_{l in T} rank * (fan_in_l + units_l)
    head        = 4 * 4 * (C*F + C)               (value, gradient, m, v)
    activations = :func:`activation_bytes` (below) + 4 * B * (2*C + F) (logits, their
                  gradient, the features' gradient)
    data        = itemsize * N * prod(input_shape) + 8 * N   (+ head mode: 4 * N * F features)
    cache       = with the prefix cache: N * the bytes of one sample's values where the
                  trained part starts (:func:`prefix_cache_bytes`); else 0
    slack       = 8 MiB                            (Python objects, temporaries)
    step_runtime = the compiled training step's share when it may run (the TVM runtime,
                  the library, its workspace and aligned copies of the parameters),
                  measured by the probe child (:mod:`.child`); 0 for the numpy step

and the learner process (the parent) holds :func:`parent_bytes` while the child runs and
:func:`commit_bytes` more once it has exited (the candidate version). The plan's
``total`` is ``parent + max(child, commit)``: the child's memory is gone before the
parent builds the candidate. The backbone's map is counted once (in ``weights``): parent
and child map the same file, whose pages the kernel holds once.

Activations are simulated over the graph at batch ``B``: the forward keeps every value
the backward reads (the inputs and outputs of the nodes downstream of the first trained
parameter, :func:`edgecl.runtime.learn.train_numpy.kept_values`) and frees the others
after their last use (the frozen prefix costs what inference costs); the backward holds
the kept values plus the gradients of the values still to be consumed. When the frozen
prefix's activations at ``B`` would outgrow the trained part's (a large input's early
layers), the learner runs the prefix a few samples at a time (:func:`prefix_chunk`) and
its peak counts at that chunk, beside the batch's start values. An activation computed in
place over the output of the node before it (``Graph.inplace``) shares that array and is
counted once. At every node a
working set is added: a node with a mask rule on a weight of shape ``[O, ...]`` works on
its im2col windows, ``out / O * in[out_axis] * prod(weight.shape[2:])`` elements (exact
for any Conv, grouped or depthwise; a Linear's input size), and a node with a
``kernel_shape`` attribute on ``out * prod(kernel_shape)``; twice that (the windows and
their gradient), plus its inputs' gradients. The peak over forward and backward counts.

An op whose numpy code says what it holds (``working_set``: the Conv, e.g. nothing for a
depthwise conv, which runs in the C kernels, nor for the forward of a plain 1x1 conv,
which multiplies the input as it is) counts that instead of the window rule.

The minimum is the plan at B = 1. The batch is chosen without the prefix cache (so a
budget never changes the batch for it); the cache is then used when the plan with it
still fits (:func:`choose` says which). The child's address-space limit is the baseline of a
bare child (measured: the interpreter, numpy, OpenBLAS' threads, the kernels) plus the
budget; see :mod:`edgecl.runtime.learn.child`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ..graph import Graph, from_model
from ..ops import get_op
from .methods import LearnMethod, get_method
from .train_numpy import backward_nodes, cut, kept_values

MiB = 1 << 20
SLACK = 8 * MiB


@dataclass
class Plan:
    batch_size: int
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    head: int
    activations: int
    data: int
    slack: int
    cache: int = 0
    step_runtime: int = 0  # the compiled step's runtime, measured (0: the numpy step)
    parent: int = 0  # the learner process while the child runs
    commit: int = 0  # the learner process after the child: the candidate version

    @property
    def child(self) -> int:
        """The learning child's bytes (what its address-space limit is for)."""
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.head
                + self.activations + self.data + self.slack + self.cache + self.step_runtime)

    @property
    def total(self) -> int:
        """The learning's bytes on the device: the parent's throughout, and the larger of
        the child's (while it trains) and the commit's (after it has exited)."""
        return self.parent + max(self.child, self.commit)

    def as_dict(self) -> dict:
        return dict(asdict(self), child=self.child, total=self.total)


def _itemsize(graph: Graph, name: str) -> int:
    return 8 if name == graph.input.name and graph.input.dtype == "int64" else 4


def _workspace(graph: Graph, node, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Elements of a node's windows (see the module docstring), 0 for none."""
    op = get_op(node.op)
    out = sum(math.prod(shapes[o]) for o in node.outputs)
    rule = op.mask
    if rule is not None and len(node.inputs) > rule.weight and node.inputs[rule.weight] in graph.params:
        w = graph.params[node.inputs[rule.weight]].shape
        data = [i for i in node.inputs if i not in graph.params]
        if len(w) >= 2 and data and w[0]:
            x = shapes[data[0]]
            c_in = x[rule.out_axis] if -len(x) <= rule.out_axis < len(x) else 1
            return out // w[0] * c_in * math.prod(w[2:])
    kernel = node.attrs.get("kernel_shape")
    if kernel:
        return out * math.prod(int(k) for k in kernel)
    return 0


def _temporaries(graph: Graph, node, shapes: Mapping[str, tuple[int, ...]], size) -> int:
    """Bytes a node's numpy code holds besides its inputs and outputs: its windows, and
    one more copy of its inputs and outputs (a padded input, a result made contiguous)."""
    data = [v for v in node.inputs if v not in graph.params]
    return (4 * _workspace(graph, node, shapes) + sum(size(v) for v in data)
            + sum(size(v) for v in node.outputs))


def _working(graph: Graph, node, shapes: Mapping[str, tuple[int, ...]], size) -> tuple[int, int]:
    """Bytes of a node's temporaries in the forward and in the backward: what the op says
    (``op.working_set``, elements), else the window rule (the backward holds the windows
    twice)."""
    own = getattr(get_op(node.op), "working_set", None)
    if own is not None:
        f, b = own([shapes[v] for v in node.inputs], node.attrs)
        return 4 * int(f), 4 * int(b)
    t = _temporaries(graph, node, shapes, size)
    return t, 4 * _workspace(graph, node, shapes) + t


def _sizer(graph: Graph, shapes: Mapping[str, tuple[int, ...]]):
    def size(v: str) -> int:
        return math.prod(shapes[v]) * _itemsize(graph, v)
    return size


def _storage(graph: Graph, nodes: Sequence) -> dict[str, str]:
    """Value -> the value whose array it is, for the outputs of the nodes that run in place
    in a pass over ``nodes`` (``Graph.inplace``, as :func:`edgecl.runtime.executor.run_node`
    decides); every other value is its own array."""
    ran, owner = set(), {}
    for n in nodes:
        if graph.inplace.get(n.name) in ran:
            owner[n.outputs[0]] = owner.get(n.inputs[0], n.inputs[0])
        ran.add(n.name)
    return owner


def _held(values: set[str], owner: Mapping[str, str], size) -> int:
    """Bytes of the arrays behind ``values`` (an in-place output shares its input's)."""
    return sum(size(v) for v in {owner.get(v, v) for v in values})


def _forward_peak(graph: Graph, nodes: Sequence, shapes, alive: set[str],
                  keep: set[str]) -> tuple[int, set[str]]:
    """(peak bytes, the values alive at the end) of running ``nodes`` forward from the
    values ``alive``, each value freed after its last use unless in ``keep``."""
    size = _sizer(graph, shapes)
    owner = _storage(graph, nodes)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            last[v] = i
    alive, peak = set(alive), 0
    for i, n in enumerate(nodes):
        alive |= set(n.outputs)
        peak = max(peak, _held(alive, owner, size) + _working(graph, n, shapes, size)[0])
        alive -= {v for v in n.inputs if last.get(v) == i and v not in keep}
    return peak, alive


def _backward_peak(graph: Graph, shapes, held: set[str], wanted: set[str], ran: Sequence) -> int:
    """Peak bytes of the backward for ``wanted`` with the tape ``held``, which the forward
    over the nodes ``ran`` left: a value's gradient lives from its first consumer's
    backward to its producer's."""
    size = _sizer(graph, shapes)
    base = _held(held, _storage(graph, ran), size)
    live = set(wanted)
    nodes = backward_nodes(graph, wanted)
    for n in nodes:
        live |= set(n.outputs)
    grads, peak = {graph.features}, 0
    for n in reversed(nodes):
        g_in = {v for v in n.inputs if v in live and v not in graph.params}
        peak = max(peak, base + sum(size(v) for v in grads | g_in) + _working(graph, n, shapes, size)[1])
        grads = (grads - set(n.outputs)) | g_in
    return peak


def _prefix_peak(graph: Graph, wanted: set[str], chunk: int) -> int:
    """Peak bytes of the frozen prefix's forward over ``chunk`` samples (its start values
    kept, every other value freed after its last use)."""
    c = cut(graph, wanted)
    return _forward_peak(graph, c.prefix, graph.shapes(chunk), {graph.input.name}, set(c.cached(graph)))[0]


def _suffix_peak(graph: Graph, wanted: set[str], batch: int) -> int:
    """Peak bytes of the trained part's forward (from the start values and the batch's
    inputs) and backward at ``batch``."""
    c = cut(graph, wanted)
    shapes = graph.shapes(batch)
    keep = kept_values(graph, wanted) | {graph.features}
    peak, held = _forward_peak(graph, c.suffix, shapes, {graph.input.name, *c.starts}, keep)
    return max(peak, _backward_peak(graph, shapes, held, wanted, c.suffix))


def _chunk_within(peak, batch: int, limit: int) -> int:
    """The batch when ``peak(batch) <= limit``, else the most samples ``c`` whose
    ``peak(c)`` stays within ``limit`` (at least 1); ``peak`` grows with the samples."""
    if peak(batch) <= limit:
        return batch
    chunk = max(1, min(batch, limit // max(1, peak(1))))
    while chunk > 1 and peak(chunk) > limit:
        chunk -= 1
    return chunk


def _prefix_split(graph: Graph, wanted: set[str], batch: int) -> tuple[int, int, int] | None:
    """(chunk, the prefix's peak at the chunk, the trained part's peak at ``batch``) for
    :func:`prefix_chunk` and :func:`activation_bytes`; None without a frozen prefix to
    cache (nothing trained, or the trained part starts at the input)."""
    if not wanted or not cut(graph, wanted).cached(graph):
        return None
    suffix = _suffix_peak(graph, wanted, batch)
    peaks: dict[int, int] = {}

    def peak(c: int) -> int:
        if c not in peaks:
            peaks[c] = _prefix_peak(graph, wanted, c)
        return peaks[c]

    chunk = _chunk_within(peak, batch, max(suffix, SLACK))
    return chunk, peak(chunk), suffix


def prefix_chunk(graph: Graph, wanted: Sequence[str] | set[str], batch: int) -> int:
    """The samples the learner runs the frozen prefix over at once, for a trained part
    ``wanted`` at ``batch``: the batch, unless the prefix's activations at the batch would
    outgrow the trained part's own (forward and backward at the batch) and the plan's slack;
    then the most samples whose prefix activations stay within that. A large input's early
    layers (MobileNetV2 at 224x224: ~150 MiB a value at batch 32) then cost what the
    trained part costs, not the peak of the whole learning run. Forward only and per
    sample: the start values are the same bytes at any chunk (see :mod:`.train_numpy`)."""
    batch = max(1, int(batch))
    split = _prefix_split(graph, set(wanted), batch)
    return batch if split is None else split[0]


def feature_chunk(graph: Graph, batch: int) -> int:
    """The samples a method that trains no site (head mode) computes the features of at
    once: the batch, unless the forward's activations at the batch exceed the plan's slack
    (the head's own step is a few ``[B, F]`` arrays); then the most samples within it."""

    def peak(c: int) -> int:
        return _forward_peak(graph, graph.backbone_nodes, graph.shapes(c), {graph.input.name},
                             {graph.features})[0]

    return _chunk_within(peak, max(1, int(batch)), SLACK)


def activation_bytes(graph: Graph, batch: int, wanted: Sequence[str] | set[str] = ()) -> int:
    """Peak bytes of values, value gradients and op working sets of one forward (keeping
    what the backward for ``wanted`` reads) and that backward, at ``batch``. When the
    learner runs the frozen prefix in chunks (:func:`prefix_chunk` below the batch), the
    prefix's peak is at the chunk, beside the batch's start values it fills."""
    wanted = set(wanted)
    split = _prefix_split(graph, wanted, batch)
    shapes = graph.shapes(batch)
    if split is not None and split[0] < batch:
        chunk, prefix, suffix = split
        size = _sizer(graph, shapes)
        starts = sum(size(v) for v in cut(graph, wanted).cached(graph)) + size(graph.input.name)
        return max(prefix + starts, suffix)
    keep = kept_values(graph, wanted) | {graph.features}
    peak, held = _forward_peak(graph, graph.backbone_nodes, shapes, {graph.input.name}, keep)
    return max(peak, _backward_peak(graph, shapes, held, wanted, graph.backbone_nodes))


def prefix_cache_bytes(graph: Graph, wanted: Sequence[str] | set[str], n_samples: int) -> int:
    """Bytes of the learner's prefix cache: every sample's values where the trained part
    starts (:meth:`edgecl.runtime.learn.train_numpy.Cut.cached`); 0 when the trained part
    starts at the input (or nothing is trained)."""
    if not wanted:
        return 0
    shapes = graph.shapes(1)
    names = cut(graph, wanted).cached(graph)
    return n_samples * sum(math.prod(shapes[v]) * _itemsize(graph, v) for v in names)


def plan(graph: Graph | Mapping, *, mode: str | LearnMethod, n_tasks: int, n_classes: int, n_samples: int,
         batch_size: int, trainable_layers: Sequence[str] | None = None,
         backbone_bytes: int = 0, prefix_cache: bool = False, step_runtime: int = 0,
         parent: int = 0, commit: int = 0) -> Plan:
    """The bytes of a learning run with method ``mode`` (a name in
    :data:`.methods.LEARN_METHODS`). ``trainable_layers``: the trained mask sites by node
    name (default: every site; a method that trains no site: none). ``prefix_cache``:
    count the learner's cache of the values where the trained part starts
    (:func:`prefix_cache_bytes`). ``step_runtime``, ``parent``, ``commit``: the
    batch-independent terms the learner measures or computes (:func:`parent_bytes`,
    :func:`commit_bytes`), stored as given."""
    method = get_method(mode)
    graph = graph if isinstance(graph, Graph) else from_model(graph)
    sites = graph.mask_sites()
    counts = {s.node: math.prod(s.shape) for s in sites}
    weight_of = {s.node: s.weight for s in sites}
    n_w = sum(counts.values())
    if not method.trains_sites:
        t_sites: list[str] = []
    elif trainable_layers is None:
        t_sites = list(counts)
    else:
        unknown = [n for n in trainable_layers if n not in counts]
        if unknown:
            raise KeyError(f"not mask sites of the graph: {unknown}")
        t_sites = list(trainable_layers)
    n_t = sum(counts[n] for n in t_sites)
    units = {s.node: s.units for s in sites}
    state, grads, opt = method.plan_sites([(units[n], counts[n] // units[n]) for n in t_sites])
    feat = int(graph.feature_dim)
    in_size = math.prod(graph.input_shape) * _itemsize(graph, graph.input.name)
    b = int(batch_size)
    weights = backbone_bytes + 4 * n_t + (n_w // 8 + len(counts)) * (n_tasks + 2)
    weights += method.plan_weights(n_w, n_t, backbone_bytes)
    cache = 0
    if not method.trains_sites:  # a head on features computed once (feature_chunk samples at a time)
        acts = max(activation_bytes(graph, feature_chunk(graph, b)), 4 * b * feat) + 4 * b * 2 * n_classes
        data = n_samples * (in_size + 4 * feat) + 8 * n_samples
    else:
        wanted = {weight_of[n] for n in t_sites}
        acts = activation_bytes(graph, b, wanted) + 4 * b * (2 * n_classes + feat)
        data = n_samples * in_size + 8 * n_samples
        if prefix_cache:
            cache = prefix_cache_bytes(graph, wanted, n_samples)
    return Plan(
        batch_size=b, weights=weights,
        trainable=state, gradients=grads, optimizer=opt,
        head=16 * (n_classes * feat + n_classes),
        activations=acts, data=data, slack=SLACK, cache=cache,
        step_runtime=int(step_runtime), parent=int(parent), commit=int(commit))


def _site_weights(graph: Graph) -> tuple[int, int]:
    """(weights of every mask site, of the largest)."""
    sizes = [math.prod(s.shape) for s in graph.mask_sites()] or [0]
    return sum(sizes), max(sizes)


def parent_bytes(graph: Graph, *, n_samples: int, n_canaries: int, old_classes: Sequence[int]) -> int:
    """What the learner process holds while the child trains: the samples (``x``, the
    local labels, the train/holdout indices), the canary inputs and every old task's
    canary logits. (The backbone's map is the child's ``weights``: the same file pages.)"""
    in_elems = math.prod(graph.input_shape)
    return (n_samples * (in_elems * _itemsize(graph, graph.input.name) + 8 + 8)
            + 4 * n_canaries * in_elems + 4 * n_canaries * sum(int(c) for c in old_classes))


def commit_bytes(graph: Graph, *, method: str | LearnMethod, n_tasks: int, n_classes: int,
                 old_classes: Sequence[int], n_canaries: int, n_holdout: int, n_samples: int,
                 backbone_bytes: int, routers: bool, canary_batch: int | None = None) -> int:
    """What the learner process adds once the child has exited, to verify and commit:

    - the child's result: the task's tensors (packed masks of every site, the head) and,
      when the method changes the backbone, the new backbone's tensors, its serialized
      file in the transaction, and the owned-entries check (the union, one task's owned
      entries, two copies of a site's owned weights);
    - the canaries on the candidate: two tasks' materialized weights at a time
      (``4 * sum_l n_l`` each: a weight-bits task copies every site; the learner's
      runtimes keep one task activated) + the inference activations at the canaries'
      batch (``canary_batch`` rows at a time, default all) + the new logits; the holdout
      accuracy: activations at its batch and its inputs;
    - the routers' refit (``routers``): its own runtime on the candidate (which caches
      activated tasks up to 64 MiB), a forward over the ``N`` new samples in one batch and
      three ``[N, F]`` arrays (features, score vectors, their deviations).

    The stages run one after another: the largest counts, with the result beside it."""
    method = get_method(method)
    n_w, n_max = _site_weights(graph)
    feat = int(graph.feature_dim)
    task = 4 * n_w  # one activated task's materialized weights
    result = 2 * ((n_w // 8 + len(graph.mask_sites())) + 4 * (n_classes * feat + n_classes))
    if method.changes_backbone:
        result += 2 * backbone_bytes + 2 * n_w + 8 * n_max
    logits = 4 * n_canaries * (sum(int(c) for c in old_classes) + n_classes)
    rows = max(1, min(n_canaries, canary_batch or n_canaries))
    in_bytes = math.prod(graph.input_shape) * _itemsize(graph, graph.input.name)
    stages = [2 * task + activation_bytes(graph, rows) + logits,
              2 * task + activation_bytes(graph, max(1, n_holdout)) + n_holdout * in_bytes]
    if routers:
        cached = min((n_tasks + 1) * task, (64 << 20) + task)
        # one forward over the N samples at a time, and [N, F] features and scores beside it
        stages.append(task + cached + activation_bytes(graph, max(1, n_samples)) + 3 * 4 * n_samples * feat)
    return result + max(stages)


def choose(budget_bytes: int | None, preferred_batch: int, *, prefix_cache: bool = False,
           **kw) -> tuple[Plan, Plan]:
    """(the plan for the largest batch <= preferred that fits, the minimum plan).

    The batch is chosen without the prefix cache; with ``prefix_cache`` the returned plan
    then counts the cache if it still fits the budget at that batch (its ``cache`` is 0 when
    it does not: the learner then recomputes the prefix every step). Raises
    ``ValueError`` with the minimum when even a batch of 1 does not fit."""
    minimum = plan(batch_size=1, **kw)
    if budget_bytes is None:
        lo = max(1, int(preferred_batch))
    else:
        if minimum.total > budget_bytes:
            raise ValueError(minimum.total)
        lo, hi = 1, max(1, int(preferred_batch))
        while lo < hi:  # the total grows with the batch: the largest that fits
            mid = (lo + hi + 1) // 2
            if plan(batch_size=mid, **kw).total <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
    chosen = plan(batch_size=lo, **kw)
    if prefix_cache:
        cached = plan(batch_size=lo, prefix_cache=True, **kw)
        if budget_bytes is None or cached.total <= budget_bytes:
            chosen = cached
    return chosen, minimum

"""Routers in the bundle: one safetensors file each, listed under the manifest's
``routers`` key (``{name: {"file", "tasks"}}``) with ``default_router``."""

from __future__ import annotations

from ..bundle import Bundle
from .base import Router, RouterError


def router_names(bundle: Bundle) -> list[str]:
    return sorted(bundle.manifest.get("routers", {}))


def default_router(bundle: Bundle) -> str:
    name = bundle.manifest.get("default_router")
    if not name:
        raise RouterError(f"{bundle.root}: the bundle has no router; give --task, or fit one "
                          f"with 'edgecl bundle' from a run")
    return name


def read_router(bundle: Bundle, name: str) -> Router:
    """The stored router ``name`` as it is (it may cover fewer tasks than the bundle)."""
    from . import ROUTERS

    entry = bundle.manifest.get("routers", {}).get(name)
    if entry is None:
        have = ", ".join(router_names(bundle)) or "none"
        raise RouterError(f"{bundle.root}: no router {name!r} (the bundle has: {have})")
    if name not in ROUTERS:
        raise RouterError(f"{bundle.root}: router {name!r} is of a kind this runtime does not know")
    arrays, meta = bundle.read_tensors(entry["file"])
    try:
        router = ROUTERS[name].from_state(arrays, meta)
    except (KeyError, ValueError) as e:
        raise RouterError(f"{bundle.where(entry['file'])}: corrupt router ({e})") from e
    return router


def load_router(bundle: Bundle, name: str | None = None) -> Router:
    """The router ``name`` (default: the bundle's), checked to cover every task."""
    router = read_router(bundle, name or default_router(bundle))
    if router.tasks != bundle.task_names:
        raise RouterError(f"{bundle.root}: router {router.name!r} covers tasks {router.tasks}, the bundle "
                          f"holds {bundle.task_names}; update it with the new tasks' data")
    return router


def refit(bundle: Bundle, data: list[tuple[str, object, object]], names: list[str] | None = None
          ) -> dict[str, tuple[dict, dict[str, str]]]:
    """The bundle's routers brought up to its tasks: {name: (arrays, metadata)}.

    ``data``: (task name, inputs, local labels or None) — needed for the tasks a router
    does not cover yet; old tasks need none. The temperature is refitted on ``data``.
    ``bundle`` may be a transaction's candidate (the version being committed)."""
    import numpy as np

    from ..session import Runtime
    from . import ROUTERS

    rt = Runtime(bundle)
    by_name = {n: (x, y) for n, x, y in data}
    states = {}
    for name in names or list(ROUTERS):
        if name not in ROUTERS:
            raise RouterError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
        router = read_router(bundle, name) if name in router_names(bundle) else ROUTERS[name]()
        if router.tasks != bundle.task_names[: len(router.tasks)]:
            router = ROUTERS[name]()  # another task history: start again from the data
        for task in bundle.task_names[len(router.tasks):]:
            if task not in by_name:
                raise RouterError(f"router {name}: no data for task {task!r}, which it must learn")
            x, y = by_name[task]
            x = rt.check_input(np.asarray(x).reshape(len(x), *rt.input_shape))
            router.add_task(rt, task, x, None if y is None else np.asarray(y))
        calib = [(bundle.task_names.index(n), rt.check_input(np.asarray(x).reshape(
            len(x), *rt.input_shape))) for n, x, _ in data if n in bundle.task_names]
        if calib:
            router.calibrate(rt, calib)
        states[name] = router.state()
    return states


def set_routers(tx, states: dict[str, tuple[dict, dict[str, str]]]) -> None:
    """Put refitted routers into a transaction (and a default router, if it has none)."""
    from . import DEFAULT_ROUTER

    for name, (arrays, meta) in sorted(states.items()):
        tx.set_router(name, arrays, meta)
    if states and not tx.manifest.get("default_router"):
        tx.manifest["default_router"] = DEFAULT_ROUTER if DEFAULT_ROUTER in states else min(states)


def update_routers(path, data: list[tuple[str, object, object]], names: list[str] | None = None) -> dict:
    """Bring the bundle's routers up to its tasks, as one new bundle version (see
    :func:`refit`). Works on the host and on the device alike. Returns {name: its tasks}."""
    from ..bundle_write import Transaction

    with Transaction(path) as tx:
        states = refit(tx.candidate(), data, names)
        set_routers(tx, states)
    return {n: s[1]["tasks"].split("\n") for n, s in states.items()}

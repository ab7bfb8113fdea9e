"""The registry of task kinds: what a task owns and how it runs (see ``base.TaskKind``).

    kind = get_kind(entry["kind"])
    kind.validate(view); params = kind.materialize(view, resolve)

Spec of each kind's tensors: ``docs/bundle.md``.
"""

from __future__ import annotations

from .added import LoRA, Merged, Modules
from .base import Params, TaskKind, TaskView, check_head
from .hashing import HashChain
from .selection import Hashed, SoftMask, UnitGates, WeightBits, hash_mask, hash_params

KINDS: dict[str, TaskKind] = {k.name: k for k in (WeightBits(), UnitGates(), SoftMask(), Hashed(),
                                                   HashChain(), LoRA(), Modules(), Merged())}


class UnknownKindError(KeyError):
    pass


def get_kind(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKindError(f"unknown task kind {name!r}; this runtime knows "
                               f"{', '.join(sorted(KINDS))}") from None


__all__ = ["KINDS", "Params", "TaskKind", "TaskView", "check_head", "get_kind", "hash_mask",
           "hash_params", "UnknownKindError"]

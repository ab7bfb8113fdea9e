"""Parameter-isolation methods behind one interface (``Method``)."""

from .base import MASK_BITS, MASK_UNITS, Method
from .epi import EPI
from .hashing import Hashing
from .hat import HAT
from .packnet import PackNet
from .supsup import Piggyback, SupSup
from .tss import TSS

METHODS: dict[str, type[Method]] = {m.name: m for m in (PackNet, SupSup, Piggyback, HAT, TSS, EPI, Hashing)}

__all__ = ["EPI", "HAT", "MASK_BITS", "MASK_UNITS", "METHODS", "Hashing", "Method", "PackNet", "Piggyback",
           "SupSup", "TSS"]

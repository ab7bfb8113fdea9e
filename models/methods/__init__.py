"""Parameter-isolation methods behind one interface (``Method``)."""

from .base import MASK_BITS, MASK_UNITS, Method
from .hat import HAT
from .packnet import PackNet
from .supsup import Piggyback, SupSup

METHODS: dict[str, type[Method]] = {m.name: m for m in (PackNet, SupSup, Piggyback, HAT)}

__all__ = ["HAT", "MASK_BITS", "MASK_UNITS", "METHODS", "Method", "PackNet", "Piggyback", "SupSup"]

"""Parameter-isolation methods behind one interface (``Method``)."""

from .base import MASK_BITS, MASK_UNITS, Method
from .epi import EPI
from .experts import Experts
from .gis import GIS
from .hashing import Hashing
from .hat import HAT
from .lora import Adapter, LoRA
from .packnet import PackNet
from .pnn import PNN
from .supsup import Piggyback, SupSup
from .tss import TSS

# One line per method (the demo, the CLI and the bench tables list them in this order).
METHODS: dict[str, type[Method]] = {m.name: m for m in (
    PackNet,
    SupSup,
    Piggyback,
    HAT,
    TSS,
    EPI,
    Hashing,
    LoRA,
    Adapter,
    GIS,
    PNN,
    Experts,
)}

__all__ = ["Adapter", "EPI", "Experts", "GIS", "HAT", "MASK_BITS", "MASK_UNITS", "METHODS", "Hashing", "LoRA",
           "Method", "PackNet", "Piggyback", "PNN", "SupSup", "TSS"]

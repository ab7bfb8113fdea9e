"""Task-ID routers (see ``base``): prototype (default), entropy, gradient."""

from .base import UNKNOWN, Decision, Router, RouterError
from .entropy import EntropyRouter
from .gradient import GradientRouter
from .prototype import PrototypeRouter

ROUTERS: dict[str, type[Router]] = {r.name: r for r in (PrototypeRouter, EntropyRouter, GradientRouter)}
DEFAULT_ROUTER = "prototype"

__all__ = ["DEFAULT_ROUTER", "ROUTERS", "UNKNOWN", "Decision", "EntropyRouter", "GradientRouter",
           "PrototypeRouter", "Router", "RouterError"]

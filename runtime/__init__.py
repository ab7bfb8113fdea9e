"""The device side: numpy (and optional backends) only; never torch, never TVM's compiler."""

from .bundle import Bundle
from .engine import Routed, Session
from .errors import BundleError, EdgeclError, InputError, UnknownTaskError
from .session import Runtime

__all__ = ["Bundle", "BundleError", "EdgeclError", "InputError", "Routed", "Runtime", "Session",
           "UnknownTaskError"]

"""The device side: numpy (and optional backends) only; never torch, never TVM's compiler."""

from .bundle import Bundle
from .errors import BundleError, EdgeclError, InputError, UnknownTaskError
from .session import Runtime

__all__ = ["Bundle", "BundleError", "EdgeclError", "InputError", "Runtime", "UnknownTaskError"]

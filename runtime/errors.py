"""Errors the device side raises. Each names what is wrong and where."""


class EdgeclError(Exception):
    """Base class: every error edgecl reports to a user."""


class BundleError(EdgeclError):
    """A bundle (or one of its files) is missing, corrupt, tampered or unsupported."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class InputError(EdgeclError):
    """An input array has the wrong shape, dtype or values."""


class UnknownTaskError(EdgeclError):
    """A task name or index the bundle does not hold."""

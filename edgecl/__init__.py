"""edgecl: on-device continual learning by parameter isolation.

The package is one namespace over the repository's top-level folders:
``edgecl.models`` (host training, torch), ``edgecl.compiler`` (bundle writer, export),
``edgecl.runtime`` and ``edgecl.kernels`` (device side: numpy only), ``edgecl.tools``
(the ``edgecl`` command line) and ``edgecl.device_tests``.
"""

__version__ = "0.1.0"

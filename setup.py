"""Build hook for the C kernels; all other metadata lives in pyproject.toml.

cffi compiles ``kernels/edgecl_kernels.c`` into the extension ``edgecl.kernels._native``
(API mode) on every ``pip install .`` / ``pip install -e .``. It needs ``cffi`` at build
time (pyproject.toml's ``[build-system] requires``) and a C compiler.
"""

from setuptools import setup

setup(cffi_modules=["kernels/build_kernels.py:ffibuilder"])

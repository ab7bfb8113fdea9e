"""cffi (API mode) build of the C kernels: ``edgecl.kernels._native``.

Used by setup.py (``cffi_modules=["kernels/build_kernels.py:ffibuilder"]``), so a
``pip install .`` or ``pip install -e .`` compiles the kernels for the host; and by
``scripts/build_kernels_aarch64.sh`` for the arm64 cross build. Run directly
(``python kernels/build_kernels.py``) it builds the module in place, next to this file.

Flags: -O3 with the vectorizer on, no -march=native (x86-64 dispatches to AVX2 at load
time through target_clones, see edgecl_kernels.c), -ffp-contract=off (and no fast-math) so
the float kernels round like the numpy reference, -fno-math-errno so sqrtf vectorizes.
Extra flags can be added with the environment variable EDGECL_KERNELS_CFLAGS.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "edgecl_kernels.h"
SOURCE = HERE / "edgecl_kernels.c"
MODULE = "edgecl.kernels._native"

# Order matters: a later -fno-fast-math would turn math-errno back on (and sqrtf would
# no longer vectorize); fast-math is off by default, so it is not named here.
CFLAGS = ["-O3", "-ftree-vectorize", "-ffp-contract=off", "-fno-math-errno", "-Wall",
          "-Wno-unused-function"]


def _cdef() -> str:
    """The header's declarations, without its preprocessor lines (cffi's cdef has none)."""
    return "\n".join(line for line in HEADER.read_text().splitlines() if not line.lstrip().startswith("#"))


def make_builder(absolute: bool = False) -> FFI:
    """The FFI builder. setuptools wants sources relative to the project root (the
    working directory of a build); ``ffi.compile`` changes directory, so it gets
    absolute paths."""

    def path(p: Path) -> str:
        if absolute:
            return str(p)
        try:
            return os.path.relpath(p)
        except ValueError:  # another drive (Windows)
            return str(p)

    ffi = FFI()
    ffi.cdef(_cdef())
    ffi.set_source(
        MODULE,
        '#include "edgecl_kernels.h"\n',
        sources=[path(SOURCE)],
        include_dirs=[path(HERE)],
        depends=[path(HEADER)],
        extra_compile_args=CFLAGS + shlex.split(os.environ.get("EDGECL_KERNELS_CFLAGS", "")),
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()


if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = Path(make_builder(absolute=True).compile(tmpdir=tmp, verbose=True))
        dest = HERE / built.name
        # a new file renamed over the old one: a process that has the old module loaded
        # keeps its (unlinked) mapping instead of seeing its code change under it
        part = dest.with_name(dest.name + ".part")
        shutil.copy2(built, part)
        os.replace(part, dest)
    print(dest)

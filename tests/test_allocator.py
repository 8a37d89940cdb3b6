"""dpfit.training.allocator: glibc malloc keeps freed memory, so repeated large allocations stop faulting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra_utils import compose_train

# malloc, touch and free 20 MB per round (a large step's row tables): with glibc's defaults the block is
# mapped and unmapped, or the heap top grown and trimmed, so its 5120 pages fault in again
CHILD = r"""
import ctypes, json, resource, sys
from dpfit.training.allocator import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rounds(n):
    for _ in range(n):
        block = libc.malloc(20 << 20)
        ctypes.memset(block, 1, 20 << 20)
        libc.free(block)
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(json.dumps({"ok": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_page_faults():
    default, keep = _faults("default"), _faults("keep")
    assert keep["ok"] is True
    assert default["faults"] > 4000, default  # the block's pages faulted in again at least once
    assert keep["faults"] < default["faults"] / 20, (default, keep)


def test_training_config_keeps_freed_memory_by_default(tmp_path):
    cfg = compose_train([], tmp_path)
    assert cfg.keep_freed_memory is True
    assert compose_train(["keep_freed_memory=false"], tmp_path).keep_freed_memory is False

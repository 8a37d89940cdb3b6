"""Neighbour statistics of training data and DeePMD-kit's ``sel: "auto"`` rule.

    stat = neighbor_stat(load_systems(paths, type_map), rcut=6.0, ntypes=2)
    stat.max_nbor      # most neighbours of each type within rcut, over every atom of every frame
    stat.min_dist      # shortest distance between two atoms (any periodic image), Å
    auto_sel(stat.max_nbor, 1.1)   # DeePMD-kit's sel for "auto:1.1": each count * 1.1, rounded up to a multiple of 4

Counting follows DeePMD-kit's ``dp neighbor-stat``: a neighbour is any other atom, or any periodic
image of any atom including the atom's own, strictly closer than ``rcut``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpfit.data.neighbor import _pairs
from dpfit.data.system import FrameSource

#: DeePMD-kit's default headroom of ``sel: "auto"``
DEFAULT_RATIO = 1.1


@dataclass
class NeighborStat:
    max_nbor: list[int]
    min_dist: float
    nframes: int


def parse_auto_sel(sel: Any) -> float | None:
    """The ratio of ``auto`` (1.1) or ``auto:R``; None when ``sel`` is not an auto request.

    Raises ValueError naming ``data.sel`` for any other string and for a ratio that is not positive."""
    if not isinstance(sel, str):
        return None
    words = sel.strip().split(":")
    if words[0] != "auto":
        raise ValueError(f"data.sel={sel!r}: give a list of counts per type (e.g. [46,92]), auto or auto:<ratio>")
    if len(words) == 1:
        return DEFAULT_RATIO
    try:
        ratio = float(words[1]) if len(words) == 2 else float("nan")
    except ValueError:
        ratio = float("nan")
    if not ratio > 0:
        raise ValueError(f"data.sel={sel!r}: the ratio of auto:<ratio> must be a positive number (e.g. auto:1.1)")
    return ratio


def wrap_up_4(x: float) -> int:
    """DeePMD-kit's rounding: the integer part, rounded up to a multiple of 4."""
    return 4 * ((int(x) + 3) // 4)


def auto_sel(max_nbor: list[int], ratio: float = DEFAULT_RATIO) -> list[int]:
    """``sel`` for ``auto:ratio`` from the most neighbours per type (as DeePMD-kit's update_sel)."""
    return [wrap_up_4(n * ratio) for n in max_nbor]


def frame_neighbor_counts(coord: np.ndarray, atype: np.ndarray, box: np.ndarray | None, rcut: float,
                          ntypes: int) -> tuple[np.ndarray, float]:
    """(neighbours of each type within rcut per atom (natoms, ntypes), shortest pair distance) of one frame."""
    coord = np.ascontiguousarray(coord, dtype=np.float64)
    natoms = len(coord)
    i, j, _, d = _pairs(coord, None if box is None else np.asarray(box, dtype=np.float64).reshape(3, 3), rcut)
    counts = np.bincount(i * ntypes + np.asarray(atype)[j], minlength=natoms * ntypes).reshape(natoms, ntypes)
    return counts, float(d.min()) if len(d) else math.inf


def neighbor_stat(systems: list[FrameSource], rcut: float, ntypes: int) -> NeighborStat:
    """Most neighbours per type and shortest distance over every frame of ``systems``."""
    most = np.zeros(ntypes, dtype=np.int64)
    min_dist = math.inf
    nframes = 0
    for system in systems:
        for f in range(system.nframes):
            frame = system.frame(f)
            counts, dmin = frame_neighbor_counts(frame["coord"], frame["atype"], frame["box"], rcut, ntypes)
            if len(counts):
                most = np.maximum(most, counts.max(axis=0))
            min_dist = min(min_dist, dmin)
            nframes += 1
    return NeighborStat([int(n) for n in most], min_dist, nframes)


def describe(stat: NeighborStat, rcut: float, type_map: list[str] | None, sel: list[int] | None = None,
             ratio: float | None = None) -> str:
    """One line for the log / the command line."""
    names = type_map or [str(t) for t in range(len(stat.max_nbor))]
    most = ", ".join(f"{n} {t}" for n, t in zip(stat.max_nbor, names))
    text = (f"neighbour statistics of {stat.nframes} frames within rcut={rcut:g} Å: at most {most}; "
            f"shortest distance {stat.min_dist:.4f} Å")
    if sel is not None:
        text += f"; sel=auto:{ratio:g} -> {sel}"
    return text

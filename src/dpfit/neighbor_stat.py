"""``python -m dpfit.neighbor_stat systems=[path,...] [rcut=6.0] [type_map=[O,H]] [sel=auto:1.1]``
(or ``dpfit-neighbor-stat ...``): the most neighbours of each type within ``rcut`` over every frame of
the systems, the shortest distance, and the ``sel`` that ``data.sel=auto`` (DeePMD-kit's ``"sel": "auto"``)
would train with. The counting is :mod:`dpfit.data.neighbor_stat`'s, as DeePMD-kit's ``dp neighbor-stat``."""

from __future__ import annotations

import sys

KEYS = ("systems", "rcut", "type_map", "sel")


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from dpfit.data.neighbor_stat import auto_sel, describe, neighbor_stat, parse_auto_sel
    from dpfit.data.system import load_systems

    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        bad = [a for a in argv if "=" not in a or a.split("=", 1)[0] not in KEYS]
        if bad:
            raise ValueError(f"{bad[0]}: expected key=value with a key among {', '.join(KEYS)}")
        args = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
        systems = args.get("systems")
        if not systems:
            raise ValueError("systems=[path,...] is required (deepmd/npy folders or ASE-readable files)")
        systems = [systems] if isinstance(systems, str) else [str(s) for s in systems]
        rcut = float(args.get("rcut", 6.0))
        type_map = [str(t) for t in args["type_map"]] if args.get("type_map") else None
        ratio = parse_auto_sel(str(args.get("sel", "auto")))
        loaded = load_systems(systems, type_map)
        ntypes = len(type_map) if type_map else max(int(s.atype.max()) + 1 for s in loaded)
        stat = neighbor_stat(loaded, rcut, ntypes)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sel = auto_sel(stat.max_nbor, ratio)
    print(describe(stat, rcut, type_map, sel, ratio))
    print(f"data.sel={sel}".replace(" ", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

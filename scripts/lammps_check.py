"""Run dpfit's exported models in the real LAMMPS + DeePMD-kit and compare with dpfit (see lammps_check.sh).

    python scripts/lammps_check.py [--work DIR] [--trained CKPT] [--steps 1000] [--only run0,dptest,...]
                                   [--kernels on|off] [--ops-library LIB]

Needs ``../shared/tools/peer_lammps.sh setup`` once (LAMMPS 2025.7.22 + DeePMD-kit 3.2.0, CPU). dpfit runs
in this Python (``freeze.py``, ``test.py``, ``train.py``); LAMMPS and ``dp`` run through peer_lammps.sh.
Prints one line per check (figure, tolerance, PASS/FAIL) and exits 1 if any check fails. With ``--kernels on``
(the default) the exported files call dpfit's op library, built for LAMMPS's torch by
``scripts/build_ops_library.sh`` (or ``--ops-library``) and loaded with ``DP_PLUGIN_PATH`` (LAMMPS, ``dp``) or
``torch.ops.load_library`` (DeePMD-kit's Python).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PEER = SHARED / "tools" / "peer_lammps.sh"
PEER_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "peer-lammps"
WATER = SHARED / "data" / "water"
DATA3 = WATER / "data_3"
FIXTURE_W = SHARED / "fixtures" / "deepmd_water_se_e2_a" / "model.ckpt.pt"
FIXTURE_C = SHARED / "fixtures" / "deepmd_cho_nopbc_fparam" / "model.ckpt.pt"
CHO = SHARED / "data" / "nopbc" / "C3H3O4"
NKTV2P = 1.6021765e6  # LAMMPS metal units: pressure (bar) * volume (Å^3) / NKTV2P = eV
MASSES = {"H": 1.008, "C": 12.011, "O": 15.999}
RESULTS: list[tuple[str, str, bool]] = []


def note(name: str, value: float, tol: float | None, unit: str = "") -> bool:
    ok = tol is None or (np.isfinite(value) and value <= tol)
    figure = f"{value:.3e}{unit}" + (f" (tol {tol:.0e})" if tol is not None else "")
    RESULTS.append((name, figure, ok))
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {figure}", flush=True)
    return ok


def sh(cmd: list, cwd: Path, log: str) -> str:
    """Run ``cmd``; its output goes to ``cwd/log``; raise with the tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    (cwd / log).write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({log}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"    [{time.time() - t0:6.1f} s] {' '.join(Path(str(c)).name for c in cmd[:3])} ...", flush=True)
    return proc.stdout + proc.stderr


def peer(args: list, cwd: Path, log: str) -> str:
    return sh(["sh", PEER, *args], cwd, log)


def mpirun(n: int, args: list, cwd: Path, log: str) -> str:
    """``mpirun -np n`` of the peer's LAMMPS, with the environment peer_lammps.sh sets."""
    launcher = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"
    return peer(["python", "-c", launcher, PEER_DIR / "bin" / "mpirun", "-np", n, PEER_DIR / "bin" / "lmp", *args],
                cwd, log)


KERNELS = "on"  # freeze.py's kernels option (--kernels)


def dpfit(script: str, overrides: list, cwd: Path, log: str) -> str:
    if script == "test.py":  # PyTorch's path: the reference predictions
        overrides = [*overrides, "kernels=off"]
    if script == "freeze.py" and not any(o.startswith("format=deepmd") for o in overrides):
        overrides = [*overrides, f"kernels={KERNELS}"]
    return sh([sys.executable, REPO / script, *overrides, f"hydra.run.dir={cwd / 'hydra' / log}"], cwd, log + ".log")


# ------------------------------------------------------------------------------------------------ files
def write_system(path: Path, coord, atype, type_map, box=None, fparam=None, aparam=None) -> Path:
    """A deepmd/npy system (nopbc when ``box`` is None) of frames coord (nf, natoms, 3)."""
    (path / "set.000").mkdir(parents=True, exist_ok=True)
    np.savetxt(path / "type.raw", atype, fmt="%d")
    (path / "type_map.raw").write_text("\n".join(type_map) + "\n")
    nf = len(coord)
    np.save(path / "set.000" / "coord.npy", np.asarray(coord, dtype=np.float64).reshape(nf, -1))
    if box is None:
        (path / "nopbc").write_text("")
    else:
        np.save(path / "set.000" / "box.npy", np.asarray(box, dtype=np.float64).reshape(nf, 9))
    if fparam is not None:
        np.save(path / "set.000" / "fparam.npy", np.asarray(fparam, dtype=np.float64).reshape(nf, -1))
    if aparam is not None:
        np.save(path / "set.000" / "aparam.npy", np.asarray(aparam, dtype=np.float64).reshape(nf, -1))
    return path


def write_data(path: Path, coord, atype, type_map, box=None) -> Path:
    """LAMMPS data file (atom_style atomic); an orthogonal ``box`` or, without one, a box 30 Å around."""
    if box is None:
        lo, hi = coord.min(0) - 30.0, coord.max(0) + 30.0
    else:
        box = np.asarray(box, dtype=np.float64).reshape(3, 3)
        if np.abs(box - np.diag(np.diag(box))).max() > 0:
            raise ValueError("write_data: only orthogonal boxes")
        lo, hi = np.zeros(3), np.diag(box)
    lines = [f"{path.name}", "", f"{len(coord)} atoms", f"{len(type_map)} atom types", ""]
    lines += [f"{float(lo[a])!r} {float(hi[a])!r} {x}lo {x}hi" for a, x in enumerate("xyz")]
    lines += ["", "Masses", ""] + [f"{t + 1} {MASSES.get(n, 1.0)}" for t, n in enumerate(type_map)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {int(t) + 1} {float(x)!r} {float(y)!r} {float(z)!r}" for k, (t, (x, y, z)) in
              enumerate(zip(atype, coord))]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_detail(prefix: Path) -> dict:
    """test.py / dp test -d detail files -> predicted and reference energy (nf,), force (nf*n, 3), virial."""
    out = {}
    for key, suffix, ncol in (("energy", ".e.out", 1), ("force", ".f.out", 3), ("virial", ".v.out", 9)):
        path = Path(str(prefix) + suffix)
        if path.exists():
            a = np.loadtxt(path, ndmin=2)
            out[key], out["data_" + key] = a[:, ncol:], a[:, :ncol]
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ------------------------------------------------------------------------------------------------ LAMMPS
RUN0 = """units metal
boundary {boundary}
atom_style atomic
variable f index {frames}
label loop
clear
units metal
boundary {boundary}
atom_style atomic
read_data frame_${{f}}.data
pair_style deepmd {model}{extra}
pair_coeff * * {elements}
neighbor 2.0 bin
compute pv all pressure NULL virial
thermo_style custom step pe c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6] vol
dump d all custom 1 {tag}_${{f}}.dump id fx fy fz
dump_modify d sort id format float %.17g
run 0
print "RES ${{f}} $(pe:%.17g) $(c_pv[1]:%.17g) $(c_pv[2]:%.17g) $(c_pv[3]:%.17g) $(c_pv[4]:%.17g) $(c_pv[5]:%.17g) $(c_pv[6]:%.17g) $(vol:%.17g)"
undump d
next f
jump SELF loop
"""

NVE = """units metal
boundary p p p
atom_style atomic
read_data {data}
pair_style deepmd {model}
pair_coeff * * {elements}
neighbor 1.0 bin
velocity all create 330.0 4928459 mom yes rot yes dist gaussian
timestep 0.001
fix 1 all nve
thermo {every}
thermo_style custom step pe ke etotal
thermo_modify format float %.17g
{dump}run {steps}
"""


def lammps_run0(work: Path, model: Path, tag: str, frames: list[int], elements: str, periodic: bool,
                extra: str = "") -> dict:
    text = RUN0.format(frames=" ".join(map(str, frames)), model=model, tag=tag, elements=elements, extra=extra,
                       boundary="p p p" if periodic else "f f f")
    (work / f"in.run0_{tag}").write_text(text)
    out = peer(["lmp", "-in", f"in.run0_{tag}", "-log", f"run0_{tag}.lammps"], work, f"run0_{tag}.out")
    res = {}
    for line in out.splitlines():
        if line.startswith("RES "):
            v = [float(x) for x in line.split()[1:]]
            f = int(v[0])
            p = np.array(v[2:8]) * v[8] / NKTV2P  # pressure from the virial only (bar) -> virial (eV)
            vir = np.array([p[0], p[3], p[4], p[3], p[1], p[5], p[4], p[5], p[2]])
            force = np.loadtxt(work / f"{tag}_{f}.dump", skiprows=9)[:, 1:4]
            res[f] = {"energy": v[1], "virial": vir, "force": force}
    return res


def thermo(out: str) -> np.ndarray:
    """Rows (step, pe, ke, etotal) of the thermo output."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and re.fullmatch(r"\d+", parts[0]):
            try:
                rows.append([float(x) for x in parts])
            except ValueError:
                pass
    return np.array(rows)


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dpfit-lammps-check")
    ap.add_argument("--trained", type=Path, help="a dpfit checkpoint trained on water (default: a 20-step run)")
    ap.add_argument("--steps", type=int, default=1000, help="NVE steps (1 fs)")
    ap.add_argument("--frames", default="0,20,40,60,79", help="data_3 frames for run 0")
    ap.add_argument("--only", default="", help="comma-separated subset of: run0,nve,mpi,fparam,dptest,devi,"
                                               "compress,python")
    ap.add_argument("--kernels", default="on", choices=["on", "off"],
                    help="the exported files' CPU path on dpfit's op library (default on) or PyTorch only")
    ap.add_argument("--ops-library", type=Path, help="libdpfit_ops.so built for LAMMPS's torch (default: built "
                                                     "into the work folder by scripts/build_ops_library.sh)")
    args = ap.parse_args()
    if not (PEER_DIR / "bin" / "lmp").exists():
        print(f"no peer venv at {PEER_DIR}: run `sh {PEER} setup` first", file=sys.stderr)
        return 2
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    frames = [int(f) for f in args.frames.split(",")]
    print(f"# work folder {work}")
    global KERNELS
    KERNELS = args.kernels
    if KERNELS == "on":  # the op library for LAMMPS's torch, loaded by every LAMMPS / dp run (DP_PLUGIN_PATH)
        library = args.ops_library
        if library is None:
            library = work / "ops" / "libdpfit_ops.so"
            # (cached by the sources: a rebuild only when they changed)
            sh(["sh", REPO / "scripts" / "build_ops_library.sh", PEER_DIR / "bin" / "python", work / "ops"], work,
               "build_ops.log")
        os.environ["DP_PLUGIN_PATH"] = str(Path(library).resolve())
        print(f"# exported files call dpfit's op library: DP_PLUGIN_PATH={os.environ['DP_PLUGIN_PATH']}")
    # ---- the models: the water fixture imported into dpfit, a dpfit-trained model; each exported both ways
    trained = args.trained
    if trained is None:
        trained = work / "train" / "checkpoints" / "last.ckpt"
        if not trained.exists():
            print("# training a dpfit water model (20 steps)")
            sh([sys.executable, REPO / "train.py", "experiment=water_se_e2_a", f"paths.data_root={WATER}",
                "trainer.max_steps=20", "trainer.val_check_interval=20", "summary=false", "kernels=off",
                f"hydra.run.dir={work / 'train'}"], work, "train.log")
    sources = {"W": FIXTURE_W, "T": trained.resolve()}
    print("# exporting (freeze.py format=lammps / format=deepmd) and dp --pt freeze of the checkpoints")
    for tag, ckpt in sources.items():
        for fmt, name in (("lammps", f"{tag}.pth"), ("deepmd", f"{tag}.ckpt.pt")):
            dpfit("freeze.py", [f"ckpt_path={ckpt}", f"output={work / name}", f"format={fmt}", "overwrite=true"],
                  work, f"freeze_{tag}_{fmt}")
        peer(["dp", "--pt", "freeze", "-c", f"{tag}.ckpt.pt", "-o", f"{tag}_dp.pth"], work, f"dpfreeze_{tag}.log")
    note("dp --pt freeze of both exported checkpoints", 0.0, None)

    # ---- dpfit's reference predictions: test.py on data_3
    refs = {}
    for tag, ckpt in sources.items():
        dpfit("test.py", [f"ckpt_path={ckpt}", f"systems=[{DATA3}]", f"detail_file={work / ('ref_' + tag)}"],
              work, f"test_{tag}")
        refs[tag] = read_detail(work / f"ref_{tag}")
    natoms = len(np.loadtxt(DATA3 / "type.raw"))
    coords = np.load(DATA3 / "set.000" / "coord.npy").astype(np.float64).reshape(-1, natoms, 3)
    boxes = np.load(DATA3 / "set.000" / "box.npy").astype(np.float64).reshape(-1, 3, 3)
    atype = np.loadtxt(DATA3 / "type.raw", dtype=int)
    for f in sorted(set(frames) | {0}):
        write_data(work / f"frame_{f}.data", coords[f], atype, ["O", "H"], boxes[f])

    if want("run0"):
        print(f"# LAMMPS run 0 on data_3 frames {frames}, against test.py")
        for tag in sources:
            ref = refs[tag]
            for model in (f"{tag}.pth", f"{tag}_dp.pth"):
                res = lammps_run0(work, work / model, model.replace(".pth", ""), frames, "O H", True)
                e = max(abs(res[f]["energy"] - ref["energy"][f, 0]) / abs(ref["energy"][f, 0]) for f in frames)
                fr = max(rel(res[f]["force"], ref["force"][f * natoms:(f + 1) * natoms]) for f in frames)
                vr = max(rel(res[f]["virial"], ref["virial"][f]) for f in frames)
                what = {"W": "water fixture", "T": "dpfit-trained"}[tag]
                kind = "freeze.py format=lammps" if model == f"{tag}.pth" else "dp --pt freeze"
                note(f"run 0 {what}, {kind}: energy rel", e, 1e-8)
                note(f"run 0 {what}, {kind}: forces rel (max|dF|/max|F|)", fr, 1e-8)
                note(f"run 0 {what}, {kind}: virial rel (from LAMMPS pressure)", vr, 1e-8)

    if want("nve"):
        print(f"# NVE {args.steps} steps at 1 fs, 330 K, water 192 atoms, freeze.py format=lammps")
        every = 10
        dump = f"dump t all custom {max(args.steps // 10, 1)} traj.dump id type x y z\ndump_modify t sort id\n"
        (work / "in.nve").write_text(NVE.format(data="frame_0.data", model=work / "W.pth", elements="O H",
                                                every=every, steps=args.steps, dump=dump))
        t0 = time.time()
        out = peer(["lmp", "-in", "in.nve", "-log", "nve.lammps"], work, "nve.out")
        wall = time.time() - t0
        rows = thermo(out)
        for last in sorted({args.steps // 2, args.steps}):
            part = rows[rows[:, 0] <= last]
            slope = np.polyfit(part[:, 0] * 1e-3, part[:, 3], 1)[0] / natoms
            note(f"NVE steps 0-{last}: total-energy drift (linear fit), eV/atom/ps", abs(slope), None)
            note(f"NVE steps 0-{last}: max |E_tot - E_tot(0)| per atom, eV",
                 float(np.abs(part[:, 3] - part[0, 3]).max() / natoms), None)
        note("NVE: kinetic energy at the end / at the start", rows[-1, 2] / rows[0, 2], None)
        note("NVE: wall time per step, s (shared 2-core machine)", wall / args.steps, None)
        # the same dynamics with DeePMD-kit's own frozen model of the same weights (dp --pt freeze)
        n_dp = min(100, args.steps)
        (work / "in.nve_dp").write_text(NVE.format(data="frame_0.data", model=work / "W_dp.pth", elements="O H",
                                                   every=every, steps=n_dp, dump=""))
        ref = thermo(peer(["lmp", "-in", "in.nve_dp", "-log", "nve_dp.lammps"], work, "nve_dp.out"))
        mine = rows[rows[:, 0] <= n_dp]
        note(f"NVE first {n_dp} steps, dpfit .pth vs dp --pt freeze .pth: max rel diff of pe, ke, etotal",
             max(rel(mine[:, k], ref[:, k]) for k in (1, 2, 3)), 1e-8)

    if want("mpi"):
        print("# the same NVE run, 10 steps, on 1 and 2 MPI ranks (domain decomposition, ghosts through forward_lower)")
        (work / "in.nve10").write_text(NVE.format(data="frame_0.data", model=work / "W.pth", elements="O H",
                                                  every=1, steps=10, dump=""))
        one = thermo(mpirun(1, ["-in", "in.nve10", "-log", "nve10_np1.lammps"], work, "nve10_np1.out"))
        two = thermo(mpirun(2, ["-in", "in.nve10", "-log", "nve10_np2.lammps"], work, "nve10_np2.out"))
        assert len(one) == len(two) == 11, (len(one), len(two))
        note("mpirun -np 2 vs 1: max rel diff of pe, ke, etotal over 10 steps",
             max(rel(two[:, k], one[:, k]) for k in (1, 2, 3)), 1e-8)

    if want("fparam"):
        print("# fparam/aparam model (non-periodic C/H/O fixture): LAMMPS pair_style deepmd ... fparam aparam")
        tmap = ["C", "H", "O"]
        cho_type = np.loadtxt(CHO / "type.raw", dtype=int)
        n = len(cho_type)
        cc = np.load(CHO / "set.000" / "coord.npy").astype(np.float64).reshape(-1, n, 3)[:3]
        fp, apv = 1.25, 0.4
        sysdir = write_system(work / "cho_sys", cc, cho_type, tmap, None, np.full((3, 1), fp), np.full((3, n), apv))
        dpfit("freeze.py", [f"ckpt_path={FIXTURE_C}", f"output={work / 'C.pth'}", "format=lammps",
                            "overwrite=true"], work, "freeze_C")
        dpfit("test.py", [f"ckpt_path={FIXTURE_C}", f"systems=[{sysdir}]", f"detail_file={work / 'ref_C'}"], work,
              "test_C")
        ref = read_detail(work / "ref_C")
        for f in range(3):
            write_data(work / f"frame_c{f}.data", cc[f], cho_type, tmap)
        text = RUN0.format(frames="c0 c1 c2", model=work / "C.pth", tag="C", elements="C H O",
                           extra=f" fparam {fp} aparam {apv}", boundary="f f f")
        (work / "in.run0_C").write_text(text)
        out = peer(["lmp", "-in", "in.run0_C", "-log", "run0_C.lammps"], work, "run0_C.out")
        e_err = f_err = 0.0
        for line in out.splitlines():
            if line.startswith("RES c"):
                f = int(line.split()[1][1:])
                e = float(line.split()[2])
                force = np.loadtxt(work / f"C_c{f}.dump", skiprows=9)[:, 1:4]
                e_err = max(e_err, abs(e - ref["energy"][f, 0]) / abs(ref["energy"][f, 0]))
                f_err = max(f_err, rel(force, ref["force"][f * n:(f + 1) * n]))
        note("fparam/aparam model, run 0 (3 frames): energy rel", e_err, 1e-8)
        note("fparam/aparam model, run 0: forces rel", f_err, 1e-8)

    if want("dptest"):
        print("# dp --pt test on data_3 against test.py")
        for tag, model in (("W", "W.ckpt.pt"), ("T", "T.ckpt.pt"), ("W", "W_dp.pth")):
            prefix = f"dptest_{model.replace('.', '_')}"
            peer(["dp", "--pt", "test", "-m", model, "-s", DATA3, "-d", prefix], work, prefix + ".log")
            got, ref = read_detail(work / prefix), refs[tag]
            for key in ("energy", "force"):
                rmse_dp = np.sqrt(np.mean((got[key] - got["data_" + key]) ** 2))
                rmse_fit = np.sqrt(np.mean((ref[key] - ref["data_" + key]) ** 2))
                note(f"dp --pt test -m {model}: {key} RMSE rel diff vs test.py ({rmse_dp:.6e})",
                     abs(rmse_dp - rmse_fit) / rmse_fit, 1e-10)
            note(f"dp --pt test -m {model}: predictions max rel diff vs test.py",
                 max(rel(got[k], ref[k]) for k in ("energy", "force", "virial")), 1e-10)

    if want("devi") and (work / "traj.dump").exists():
        print("# dp --pt model-devi on the NVE trajectory with the two exported models, against dpfit's predictions")
        lines = (work / "traj.dump").read_text().splitlines()
        frames_xyz = []
        for k, line in enumerate(lines):
            if line.startswith("ITEM: ATOMS"):
                frames_xyz.append(np.array([[float(x) for x in row.split()[2:5]] for row in lines[k + 1:k + 1 + natoms]]))
        traj = write_system(work / "traj_sys", np.array(frames_xyz), atype, ["O", "H"],
                            np.repeat(boxes[0][None], len(frames_xyz), 0))
        (work / "model_devi.out").unlink(missing_ok=True)  # (dp appends to it: a rerun in the same folder)
        peer(["dp", "--pt", "model-devi", "-m", "W_dp.pth", "T_dp.pth", "-s", traj, "-o", "model_devi.out"], work,
             "devi.log")
        devi = np.loadtxt(work / "model_devi.out", ndmin=2)
        forces = []
        for tag, ckpt in sources.items():
            dpfit("test.py", [f"ckpt_path={ckpt}", f"systems=[{traj}]", f"detail_file={work / ('traj_' + tag)}"],
                  work, f"test_traj_{tag}")
            forces.append(read_detail(work / f"traj_{tag}")["force"].reshape(len(frames_xyz), natoms, 3))
        forces = np.array(forces)
        std = np.sqrt(np.mean(np.sum((forces - forces.mean(0)) ** 2, axis=-1), axis=0))  # (nf, natoms)
        max_devi_f = std.max(-1)
        # Where a frame has more neighbours than sel, DeePMD-kit's Python neighbour list (dp model-devi) keeps the
        # nearest sum(sel) of all types and then splits them by type; dpfit, SPEC and LAMMPS's format_nlist keep
        # the nearest sel[t] of each type. Those frames (an NVE run that heated up) are left out, and counted.
        from dpfit.data.neighbor import build_neighbor_list
        within = np.array([build_neighbor_list(xyz, atype, boxes[0], 6.0, [46, 92], warn=False).n_dropped == 0
                           for xyz in frames_xyz])
        note(f"model-devi max_devi_f ({int(within.sum())} of {len(frames_xyz)} frames; the others exceed sel) vs "
             "dpfit's, max rel diff", rel(devi[within, 4], max_devi_f[within]) if within.any() else 0.0, 1e-6)

    if want("compress"):
        print("# dp --pt compress of the dp-frozen exported water model, then run 0 against test.py")
        try:
            peer(["dp", "--pt", "compress", "-i", "W_dp.pth", "-o", "W_cmp.pth"], work, "compress.log")
        except RuntimeError as exc:
            note(f"dp --pt compress failed: {str(exc).splitlines()[-1][:150]}", float("nan"), 1.0)
        else:
            res = lammps_run0(work, work / "W_cmp.pth", "W_cmp", frames[:2], "O H", True)
            ref = refs["W"]
            note("dp --pt compress (tabulated embedding nets), run 0: energy/forces/virial max rel diff",
                 max(max(abs(res[f]["energy"] - ref["energy"][f, 0]) / abs(ref["energy"][f, 0]),
                         rel(res[f]["force"], ref["force"][f * natoms:(f + 1) * natoms]),
                         rel(res[f]["virial"], ref["virial"][f])) for f in frames[:2]), 1e-6)

    if want("python"):
        print("# DeePMD-kit's Python: DeepPot and deepmd.calculator.DP (ASE) on each file, data_3 frame 0")
        code = (
            "import os, sys, numpy as np, torch\nfrom deepmd.infer import DeepPot\n"
            "if os.environ.get('DP_PLUGIN_PATH'):  # a file calling dpfit's op library\n"
            "    torch.ops.load_library(os.environ['DP_PLUGIN_PATH'])\n"
            "c = np.load(sys.argv[1] + '/set.000/coord.npy')[0].astype(float)\n"
            "b = np.load(sys.argv[1] + '/set.000/box.npy')[0].astype(float)\n"
            "t = np.loadtxt(sys.argv[1] + '/type.raw', dtype=int)\n"
            "try:\n    from ase import Atoms\n    from deepmd.calculator import DP\nexcept ImportError:\n"
            "    DP = None\n    print('NOASE')\n"
            "for m in sys.argv[2:]:\n"
            "    try:\n"
            "        e = DeepPot(m).eval(c[None], b[None], t)[0][0, 0]\n"
            "        print('DEEPPOT', m, repr(float(e)))\n"
            "        if DP is not None:\n"
            "            a = Atoms(symbols=['OH'[k] for k in t], positions=c.reshape(-1, 3), cell=b.reshape(3, 3),"
            " pbc=True)\n"
            "            a.calc = DP(m)\n"
            "            print('ASE', m, repr(float(a.get_potential_energy())))\n"
            "    except Exception as exc:\n"
            "        print('ERROR', m, type(exc).__name__, str(exc).splitlines()[0][:200])\n")
        (work / "deeppot_check.py").write_text(code)
        out = peer(["python", "deeppot_check.py", DATA3, "W.ckpt.pt", "W_dp.pth", "W.pth"], work, "deeppot.log")
        e_ref = refs["W"]["energy"][0, 0]
        for line in out.splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("DEEPPOT", "ASE"):
                what = "DeepPot" if word == "DEEPPOT" else "deepmd.calculator.DP"
                note(f"{what}('{line.split()[1]}') energy rel vs test.py", abs(float(line.split()[2]) - e_ref) / abs(e_ref),
                     1e-10)
            elif word == "ERROR":
                note(f"DeepPot on {line.split()[1]}: {' '.join(line.split()[2:])}", float("nan"), 1.0)
            elif word == "NOASE":
                note("deepmd.calculator.DP skipped: no ase in the peer venv (peer_lammps.sh python -m pip install ase)",
                     float("nan"), None)

    failed = [r for r in RESULTS if not r[2]]
    print(f"\n# {len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    for name, figure, _ in failed:
        print(f"  FAIL {name}: {figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

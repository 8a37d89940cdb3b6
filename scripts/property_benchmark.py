"""Train the three property models of docs/property.md and compare them with the per-type-mean baseline.

    python scripts/make_property_data.py --out data/property
    OMP_NUM_THREADS=1 python scripts/property_benchmark.py --data data/property --out runs/property

Cases (data from scripts/make_property_data.py): ``intensive`` (bvdev, task_dim 2, the mean of atomic
values), ``extensive`` (valence, the sum) and ``charge`` (partial charges from atom_charge.npy, each frame's
charges summed to 0 by ``atom_sum``). Each is trained with train.py and tested with test.py on the held-out
frames; the baseline predicts from the atom types alone, with the per-type values a model starts from
(DeePMD-kit's output statistics of the training labels: least squares on the type counts for the frame
labels, each type's mean for atomic labels). Prints, per case and test system, the RMSE of the model and
of the baseline and their ratio, and writes it as ``<out>/benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model=se_e2_a_property", "loss=property", "data=deepmd", "data.type_map=[C,H,O]", "data.numb_btch=10",
         "model.descriptor.rcut=5.0", "model.descriptor.rcut_smth=0.5", "model.descriptor.neuron=[16,32]",
         "model.descriptor.axis_neuron=8", "model.fitting_net.neuron=[64,64,64]", "data.batch_size=16",
         "loss.loss_func=mse", "schedule.start_lr=0.002", "schedule.stop_lr=1e-5", "~callbacks.progress_bar"]
CASES = {
    "intensive": ["model.fitting_net.property_name=bvdev", "model.fitting_net.task_dim=2",
                  "model.fitting_net.intensive=true"],
    "extensive": ["model.fitting_net.property_name=valence"],
    "charge": ["model.fitting_net.property_name=charge", "model.fitting_net.atom_sum=0", "loss.pref=0",
               "loss.pref_atomic=1"],
}
LABEL = {"intensive": ("bvdev", False), "extensive": ("valence", False), "charge": ("atom_charge", True)}


def read_systems(root: Path, label: str) -> list[dict]:
    out = []
    for folder in sorted(p.parent for p in root.glob("*/type.raw")):
        atype = np.loadtxt(folder / "type.raw", dtype=int).reshape(-1)
        values = np.load(folder / "set.000" / f"{label}.npy")
        out.append({"name": str(folder), "atype": atype, "values": values.reshape(len(values), -1)})
    return out


def baseline_rmse(train: list[dict], test: list[dict], case: str) -> dict[str, float]:
    """RMSE of the per-type-mean prediction on each test system and pooled over all of them."""
    from dpfit.training.statistics import property_output_stats

    _, atomic = LABEL[case]
    intensive = case == "intensive"
    if atomic:
        bias, _ = property_output_stats([], [(np.tile(s["atype"], (len(s["values"]), 1)), s["values"]) for s in train], 3)
    else:
        frames = [(np.tile(np.bincount(s["atype"], minlength=3), (len(s["values"]), 1)), s["values"]) for s in train]
        bias, _ = property_output_stats(frames, [], 3, intensive=intensive)
    errors, out = [], {}
    for s in test:
        atype = s["atype"]
        if atomic:
            pred = np.tile(bias[atype, 0], (len(s["values"]), 1))
        else:
            counts = np.bincount(atype, minlength=3).astype(float)
            pred = (counts / counts.sum() if intensive else counts) @ bias
            pred = np.tile(pred, (len(s["values"]), 1))
        diff = (pred - s["values"]).reshape(-1)
        out[s["name"]] = float(np.sqrt(np.mean(diff**2)))
        errors.append(diff)
    out["all"] = float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))
    return out


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd[:2])} failed; see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="output folder of scripts/make_property_data.py")
    parser.add_argument("--out", required=True, help="folder for the runs (must not exist)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    if out.exists():
        sys.exit(f"error: {out}: exists; choose a new folder")
    out.mkdir(parents=True)
    table = {}
    for case in args.cases:
        run_dir, test_dir = out / case, out / f"{case}_test"
        run([sys.executable, "train.py", *MODEL, *CASES[case], f"data.train_systems=[{data / 'train'}]",
             f"data.val_systems=[{data / 'test'}]", f"trainer.max_steps={args.steps}",
             f"trainer.val_check_interval={max(args.steps // 10, 1)}", f"callbacks.lcurve.disp_freq={max(args.steps // 20, 1)}",
             f"schedule.decay_steps={max(args.steps // 30, 1)}", f"hydra.run.dir={run_dir}"], out / f"{case}_train.log")
        run([sys.executable, "test.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"systems=[{data / 'test'}]",
             f"detail_file={test_dir / 'detail'}", "plots=true", f"hydra.run.dir={test_dir}"], out / f"{case}_test.log")
        metrics = json.loads((test_dir / "metrics.json").read_text())
        label, atomic = LABEL[case]
        key = "rmse_aproperty" if atomic else "rmse_property"
        base = baseline_rmse(read_systems(data / "train", label), read_systems(data / "test", label), case)
        rows = {s["name"]: (s[key], base[s["name"]]) for s in metrics["systems"]}
        rows["all"] = (metrics["average"][key], base["all"])
        table[case] = {name: {"model": m, "baseline": b, "factor": b / m} for name, (m, b) in rows.items()}
        for name, r in table[case].items():
            print(f"{case:9s} {Path(name).name:8s} RMSE model {r['model']:.4f}  baseline {r['baseline']:.4f}  "
                  f"factor {r['factor']:.1f}", flush=True)
    (out / "benchmark.json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()

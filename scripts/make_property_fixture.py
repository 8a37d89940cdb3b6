"""Make tests/fixtures/deepmd_property.json: DeePMD-kit 3.2 property models and their reference numbers.

    ../shared/tools/peer_deepmd.sh setup      # once: DeePMD-kit 3.2.0 in $TMPDIR/peer-deepmd
    $TMPDIR/peer-deepmd/bin/python scripts/make_property_fixture.py --out tests/fixtures/deepmd_property.json

Run with the peer's Python (it imports ``deepmd``). It builds a small data set from the non-periodic C/H/O
molecules (``../shared/data/nopbc``, labels of ``scripts/make_property_data.py``), trains two small se_e2_a
property models with ``dp --pt train`` (a few hundred steps, one thread):

- ``intensive``: ``bvdev`` (task_dim 2, intensive), one fparam, type_one_side, loss smooth_mae;
- ``extensive``: ``valence`` (task_dim 1, extensive), type_one_side false, loss mse;

and writes, as text (floats in full precision, so the numbers are exact): each model's ``model_params``
and state tensors (the DeePMD-kit checkpoint's ``model.Default.*`` entries), its predictions (frame and
atomic) on frames it was not trained on, its loss value on a batch for every ``loss_func``, and
DeePMD-kit's output statistics (``compute_output_stats``) of given labels. tests/test_property.py reads it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
LOSS_FUNCS = ("smooth_mae", "mae", "mse", "rmse", "mape")
TRAIN_FRAMES = 48
THREADS = {"OMP_NUM_THREADS": "1", "DP_INTRA_OP_PARALLELISM_THREADS": "1", "DP_INTER_OP_PARALLELISM_THREADS": "1"}


def _data_module():
    spec = importlib.util.spec_from_file_location("make_property_data", HERE / "make_property_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_data(root: Path, source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training systems (first TRAIN_FRAMES frames, with a synthetic fparam) under ``root``; returns the
    molecules' (atype, coord) for the reference frames."""
    mpd = _data_module()
    mols = {}
    for name in ("C1H4O2", "C3H3O4", "C4H3O1"):
        atype, coord = mpd.read_molecule(source / name)
        mols[name] = (atype, coord)
        if name == "C4H3O1":
            continue
        folder = root / name
        mpd.write_system(folder, atype, coord[:TRAIN_FRAMES])
        fparam = 300.0 + 10.0 * np.sin(np.arange(TRAIN_FRAMES))  # any per-frame input ("temperature")
        np.save(folder / "set.000" / "fparam.npy", fparam.reshape(-1, 1))
    return mols


def input_json(kind: str, systems: list[str]) -> dict:
    intensive = kind == "intensive"
    return {
        "model": {
            "type_map": ["C", "H", "O"],
            "descriptor": {"type": "se_e2_a", "sel": [4, 4, 4], "rcut": 4.0, "rcut_smth": 1.0, "neuron": [4, 8],
                           "axis_neuron": 4, "resnet_dt": False, "type_one_side": intensive, "precision": "float64",
                           "seed": 1},
            "fitting_net": {"type": "property", "property_name": "bvdev" if intensive else "valence",
                            "task_dim": 2 if intensive else 1, "intensive": intensive, "neuron": [12, 12],
                            "resnet_dt": True, "numb_fparam": 1 if intensive else 0, "precision": "float64",
                            "seed": 2},
        },
        "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-4, "decay_steps": 50},
        "loss": {"type": "property", "loss_func": "smooth_mae" if intensive else "mse", "metric": ["mae", "rmse"],
                 "beta": 1.0},
        "training": {"training_data": {"systems": systems, "batch_size": 4}, "numb_steps": 300, "seed": 3,
                     "disp_freq": 100, "save_freq": 300},
    }


def train(kind: str, work: Path, systems: list[str]) -> Path:
    folder = work / kind
    folder.mkdir()
    (folder / "input.json").write_text(json.dumps(input_json(kind, systems), indent=1))
    dp = Path(sys.executable).with_name("dp")
    env = {**os.environ, **THREADS}
    log = folder / "train.log"
    with open(log, "w") as fh:
        done = subprocess.run([str(dp), "--pt", "train", "input.json"], cwd=folder, env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: dp --pt train failed for {kind}; see {log}:\n" + log.read_text()[-2000:])
    return folder / "model.ckpt.pt"


def _tensor_entry(t) -> dict:
    a = t.detach().cpu().numpy()
    return {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.reshape(-1).tolist()}


def model_entry(ckpt: Path, mols: dict, kind: str) -> dict:
    import torch
    from deepmd.pt.loss.property import PropertyLoss
    from deepmd.pt.model.model import get_model
    from deepmd.pt.train.wrapper import ModelWrapper

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    params = state["_extra_state"]["model_params"]
    model = get_model(json.loads(json.dumps(params)))
    ModelWrapper(model).load_state_dict(state)
    model.eval()
    keep = {k: _tensor_entry(v) for k, v in state.items()
            if k != "_extra_state" and "compress_" not in k and "._networks." not in k}
    fit = params["fitting_net"]
    name, task_dim, nfp = fit["property_name"], fit["task_dim"], fit.get("numb_fparam", 0)
    frames = []
    for mol, (atype, coord) in mols.items():
        picks = [TRAIN_FRAMES + 5 * k for k in range(4)] if mol != "C4H3O1" else [0, 7]
        c = torch.tensor(coord[picks], dtype=torch.float64)
        at = torch.tensor(atype, dtype=torch.int64).expand(len(picks), -1).contiguous()
        fparam = torch.tensor([[305.0 + k] for k in range(len(picks))], dtype=torch.float64) if nfp else None
        out = model(c.reshape(len(picks), -1), at, box=None, fparam=fparam)
        frames.append({
            "system": mol, "atype": atype.tolist(), "coord": coord[picks].tolist(),
            "fparam": None if fparam is None else fparam.numpy().tolist(),
            name: out[name].detach().numpy().tolist(), f"atom_{name}": out[f"atom_{name}"].detach().numpy().tolist(),
        })
    # the loss of DeePMD-kit's PropertyLoss on one batch (4 frames of C3H3O4), for every loss_func
    mpd = _data_module()
    atype, coord = mols["C3H3O4"]
    batch = coord[TRAIN_FRAMES + 1: TRAIN_FRAMES + 5]
    label = mpd.labels(batch, atype)[name]
    losses = {}
    for func in LOSS_FUNCS:
        for beta in ((1.0, 0.25) if func == "smooth_mae" else (1.0,)):
            loss = PropertyLoss(task_dim=task_dim, var_name=name, loss_func=func, metric=["mae", "rmse"],
                                beta=beta, intensive=fit["intensive"])
            inputs = {"coord": torch.tensor(batch.reshape(len(batch), -1)),
                      "atype": torch.tensor(atype).expand(len(batch), -1).contiguous(), "box": None}
            if nfp:
                inputs["fparam"] = torch.tensor([[301.0 + k] for k in range(len(batch))], dtype=torch.float64)
            _, value, more = loss(inputs, model, {name: torch.tensor(label)}, natoms=len(atype))
            losses[f"{func}:{beta}"] = {"loss": float(value), "mae": float(more["mae"]), "rmse": float(more["rmse"])}
    batch_entry = {"system": "C3H3O4", "atype": atype.tolist(), "coord": batch.tolist(), name: label.tolist(),
                   "fparam": [[301.0 + k] for k in range(len(batch))] if nfp else None}
    return {"kind": kind, "model_params": params, "state": keep, "frames": frames, "loss_batch": batch_entry,
            "losses": losses}


def statistics_entry(mols: dict) -> dict:
    """DeePMD-kit's output statistics of given labels: frame labels (intensive or not, types distinguished
    or not) and atomic labels."""
    import torch
    from deepmd.pt.utils.stat import compute_output_stats

    mpd = _data_module()
    f64 = torch.float64
    systems = []
    for mol in ("C1H4O2", "C3H3O4"):
        atype, coord = mols[mol]
        lab = mpd.labels(coord[:20], atype)
        counts = np.bincount(atype, minlength=3)
        natoms = np.concatenate([[len(atype), len(atype)], counts])[None].repeat(20, axis=0)
        systems.append({"atype": atype.tolist(), "natoms": natoms.tolist(), "bvdev": lab["bvdev"].tolist(),
                        "atom_charge": lab["atom_charge"].tolist()})
    results = {}
    for intensive in (True, False):
        for distinguish in (True, False):
            sampled = [{"bvdev": torch.tensor(s["bvdev"], dtype=f64), "find_bvdev": 1.0, "natoms": torch.tensor(s["natoms"]),
                        "atype": torch.tensor(s["atype"]).expand(20, -1)} for s in systems]
            bias, std = compute_output_stats(sampled, 3, keys=["bvdev"], stats_distinguish_types=distinguish,
                                             intensive=intensive)
            results[f"frame:{intensive}:{distinguish}"] = {"bias": bias["bvdev"].numpy().tolist(),
                                                           "std": std["bvdev"].numpy().tolist()}
    sampled = [{"atom_charge": torch.tensor(s["atom_charge"], dtype=f64).reshape(20, -1), "find_atom_charge": 1.0,
                "natoms": torch.tensor(s["natoms"]), "atype": torch.tensor(s["atype"]).expand(20, -1)}
               for s in systems]
    bias, std = compute_output_stats(sampled, 3, keys=["charge"])
    results["atomic"] = {"bias": bias["charge"].numpy().tolist(), "std": std["charge"].numpy().tolist()}
    return {"systems": systems, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "tests" / "fixtures" / "deepmd_property.json"))
    parser.add_argument("--source", default=str(SHARED / "data" / "nopbc"))
    parser.add_argument("--keep", help="keep the training folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    import deepmd

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dpfit-property-fixture-"))
    work.mkdir(parents=True, exist_ok=True)
    mols = build_data(work / "data", Path(args.source))
    systems = [str(work / "data" / m) for m in ("C1H4O2", "C3H3O4")]
    fixture = {"deepmd_version": deepmd.__version__, "made_by": "scripts/make_property_fixture.py",
               "models": {kind: model_entry(train(kind, work, systems), mols, kind)
                          for kind in ("intensive", "extensive")},
               "statistics": statistics_entry(mols)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"written: {out} ({out.stat().st_size // 1024} KiB); training folders in {work}")


if __name__ == "__main__":
    main()

"""Throughput of dpfit on the water example: neighbor lists, energy + force inference in float64 and float32.

    python scripts/benchmark.py                      # water fixture checkpoint on ../shared/data/water
    python scripts/benchmark.py --frames 40 --batch-size 4 --device cuda --json bench.json
    python scripts/benchmark.py --kernels off --compile --backend static   # torch.compile's code vs the kernels

Each measurement is one function returning a dict (added to ``results``); neighbor lists are built once
and timed on their own, so inference timings exclude them. To add a measurement (e.g. a training step),
write ``bench_<name>(...) -> dict`` on the model of :func:`bench_inference` and call it from :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dpfit.data.batch import batch_to_device, collate, make_sample, model_inputs
from dpfit.data.system import load_systems
from dpfit.io.checkpoint import load_model
from dpfit.model import EnergyModel
from dpfit.training.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WATER_DATA = SHARED / "data" / "water"
WATER_CKPT = SHARED / "fixtures" / "deepmd_water_se_e2_a" / "model.ckpt.pt"

#: the water se_e2_a hyperparameters (SPEC section 9), for a fresh model when no checkpoint is available
WATER_CONFIG = {
    "type_map": ["O", "H"],
    "descriptor": {"sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [25, 50, 100], "axis_neuron": 16,
                   "resnet_dt": False, "type_one_side": True, "seed": 1},
    "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "seed": 1},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], n_frames: int, device: torch.device, warmup: Callable[[], object] | None = None,
    repeat: int = 1,
) -> dict:
    """Run ``warmup`` once untimed, then ``fn`` (which processes ``n_frames`` frames) ``repeat`` times timed."""
    if warmup is not None:
        warmup()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    seconds = (time.perf_counter() - start) / repeat
    return {"frames": n_frames, "seconds": seconds, "frames_per_s": n_frames / seconds,
            "ms_per_frame": 1e3 * seconds / n_frames}


def build_model(ckpt: Path | None, precision: str, device: torch.device, kernels: str = "off",
                backend: str | None = None) -> EnergyModel:
    """The checkpoint's model (or a fresh water model) in ``precision`` on ``device``, eval mode, on
    ``backend`` (None: the one selected for the device from the ``kernels`` option)."""
    if ckpt is not None:
        model = load_model(ckpt, precision=precision)
    else:
        model = EnergyModel.from_config({**WATER_CONFIG, "precision": precision}, device=None)
    model = model.to(device).eval()
    if backend:
        model.use_backend(backend, device)
    else:
        model.select_backend(device, kernels)
    return model


def pick_frames(data: Path, type_map: list[str], n_frames: int) -> list[tuple]:
    """The first ``n_frames`` (system, index) pairs over the systems found under ``data``."""
    picked = []
    for system in load_systems([data], type_map=type_map):
        picked.extend((system, i) for i in range(min(system.nframes, n_frames - len(picked))))
        if len(picked) == n_frames:
            break
    if not picked:
        raise SystemExit(f"{data}: no frames")
    return picked


def bench_neighbor_list(frames: list[tuple], rcut: float, sel: list[int]) -> tuple[dict, list[dict]]:
    """Frame reading + DeePMD neighbor list (vesin, CPU) per frame; returns the timing and the samples."""
    samples: list[dict] = []

    def build():
        samples.clear()
        samples.extend(make_sample(system, i, rcut, sel) for system, i in frames)

    result = timed(build, len(frames), torch.device("cpu"))
    result["n_dropped"] = int(sum(s["n_dropped"] for s in samples))
    return result, samples


def make_batches(samples: list[dict], batch_size: int, device: torch.device, facts: bool = True) -> list[dict]:
    """Consecutive samples of the same system stacked into batches on ``device``; ``facts``: with the
    index facts that training's collate adds (else the model derives them at every step)."""
    batches, group = [], []
    for s in samples:
        if group and (len(group) == batch_size or len(s["atype"]) != len(group[0]["atype"])):
            batches.append(group)
            group = []
        group.append(s)
    if group:
        batches.append(group)
    if not facts:
        group = [[{k: v for k, v in s.items() if k != "sel"} for s in g] for g in batches]
        batches = group
    return [batch_to_device(collate(g), device) for g in batches]


def bench_facts(samples: list[dict], batch_size: int, sel: list[int]) -> dict:
    """The index facts' share of collate (done once per batch by the data pipeline, on the host)."""
    from dpfit.data.index_facts import index_facts

    batches = make_batches(samples, batch_size, torch.device("cpu"), facts=False)

    def compute() -> None:
        for b in batches:
            index_facts(b["nlist"], b.get("shift"), b["atype"], sel)

    return timed(compute, len(samples), torch.device("cpu"), warmup=compute, repeat=3)


def bench_inference(model: EnergyModel, batches: list[dict], device: torch.device, warmup: int, repeat: int) -> dict:
    """Energy + forces (closed form, no autograd graph) over prebuilt batches."""
    n_frames = sum(len(b["coord"]) for b in batches)

    @torch.no_grad()
    def infer(subset: list[dict]) -> None:
        for batch in subset:
            model(**model_inputs(batch), do_force=True, do_virial=False)

    result = timed(lambda: infer(batches), n_frames, device, warmup=lambda: infer(batches[:warmup]), repeat=repeat)
    result["dtype"] = str(model.dtype).replace("torch.", "")
    if device.type == "cuda":
        result["max_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def bench_matmul(dtype: torch.dtype, device: torch.device, n: int | None = None, repeat: int = 20) -> dict:
    """Dense matmul GFLOP/s of this machine, the fastest of ``repeat`` products (the peak rate: on a
    shared host the average drifts with the neighbours' load): the FLOP limit the training step is
    compared with. Size ``n``: 1024 on a CPU, 8192 on a GPU (large enough to fill it)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n**3 / best / 1e9}


def train_step_fn(model: EnergyModel, batch: dict, opt: torch.optim.Optimizer | None = None, compile: bool = False):
    """One DeePMD training step (energy + force loss, forces with their graph, one backward, Adam;
    ``opt``: an optimizer shared by several batches' steps; ``compile``: the loss and its backward
    through ``torch.compile(fullgraph=True, dynamic=False)``, inductor)."""
    from dpfit.training.loss import EnergyLoss

    loss_fn = EnergyLoss()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = opt or torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as in training
    inputs = model_inputs(batch)

    def loss_of(coord):
        out = model(**{**inputs, "coord": coord}, do_force=True, create_graph=True)
        return loss_fn(out, batch, 1.0)[0]

    compute = torch.compile(loss_of, fullgraph=True, dynamic=False) if compile else loss_of

    def step() -> None:
        loss = compute(inputs["coord"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_flops(model: EnergyModel, step) -> int:
    """FLOPs of one call of ``step`` (torch.utils.flop_counter: matmuls and convolutions), counted with
    the model on PyTorch's compact layout if it runs the compiled kernels (the counter does not see
    inside them; the arithmetic is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    backend = model.backend
    if backend == "kernels":
        model.use_backend("compact")
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        model.use_backend(backend)
    return int(counter.get_total_flops())


def bench_train(model: EnergyModel, batches: list[dict], device: torch.device, repeat: int,
                matmul_gflops: float, compile: bool = False) -> dict:
    """Seconds per training step (median and fastest) over ``repeat`` passes through the batches, one
    step each, as training cycles through frames whose neighbor counts differ; the first batch's FLOPs
    and the step time as a multiple of the FLOP limit (FLOPs / matmul rate); peak memory (GPU:
    allocator; CPU: process max RSS)."""
    import resource

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    steps = [train_step_fn(model, batch, opt, compile) for batch in batches]
    start = time.perf_counter()
    for step in steps:  # one untimed pass (every batch's shapes seen once; compiling: the compilation)
        step()
    first_pass = time.perf_counter() - start
    flops = count_flops(model, train_step_fn(model, batches[0], opt) if compile else steps[0])  # (eager: the counter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(repeat, 1)):
        for step in steps:
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    seconds = times[len(times) // 2]
    limit = flops / (matmul_gflops * 1e9)
    result = {"frames": len(batches[0]["coord"]), "seconds": seconds, "frames_per_s": len(batches[0]["coord"]) / seconds,
              "ms_per_frame": 1e3 * seconds / len(batches[0]["coord"]), "s_per_step": seconds, "min_s_per_step": times[0],
              "gflop_per_step": flops / 1e9, "flop_limit_s": limit, "x_flop_limit": seconds / limit,
              "timed_steps": len(times), "first_pass_s": first_pass}
    if device.type == "cuda":
        result["max_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


SCALING_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from dpfit.data.neighbor import build_neighbor_list
from dpfit.io.checkpoint import load_model
from dpfit.model import EnergyModel
ckpt, data, reps, precision, train = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
from dpfit.data.system import load_systems
model = (EnergyModel.from_config(json.loads(sys.argv[6]), device=None) if ckpt == "fresh" else load_model(ckpt, precision=precision))
system = load_systems([data], model.type_map)[0]
frame = system.frame(0)
shifts = np.stack(np.meshgrid(*[np.arange(reps)] * 3, indexing="ij"), -1).reshape(-1, 3)
coord = (frame["coord"][None] + (shifts @ frame["box"])[:, None]).reshape(-1, 3)
atype = np.tile(frame["atype"], len(shifts))
box = frame["box"] * reps
device = torch.device(sys.argv[7])
model = model.to(device)
model.select_backend(device, sys.argv[8])
nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel, warn=False)
inp = dict(coord=torch.from_numpy(coord)[None], atype=torch.from_numpy(atype)[None], nlist=torch.from_numpy(nl.nlist)[None],
           box=torch.from_numpy(box)[None], shift=torch.from_numpy(nl.shift)[None])
inp = {k: v.to(device) for k, v in inp.items()}

def evaluate():
    with torch.set_grad_enabled(train):
        out = model(**inp, do_force=True, create_graph=train)
    if train:
        (out["energy"].sum() + out["force"].square().sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)

if device.type == "cuda":  # one warm-up (cuBLAS handles, allocator), then peak allocated bytes of a second call
    evaluate()
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
evaluate()
seconds = time.perf_counter() - start
peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"natoms": len(coord), "seconds": seconds, "peak_mib": peak / 2**20,
                  "kib_per_atom": (peak - base) / 1024 / len(coord)}))
"""


def bench_scaling(ckpt: Path | None, data: Path, precision: str, reps: list[int], train: bool,
                  device: torch.device, kernels: str) -> list[dict]:
    """Water supercells (reps^3 copies of a frame): time and peak memory per atom of one energy+force
    evaluation (``train``: with create_graph and a backward pass), each in a fresh process."""
    import subprocess
    import sys

    rows = []
    for r in reps:
        cmd = [sys.executable, "-c", SCALING_CHILD, str(ckpt) if ckpt else "fresh", str(data), str(r), precision,
               "1" if train else "0", json.dumps({**WATER_CONFIG, "precision": precision}), str(device), kernels]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            rows.append({"reps": r, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        rows.append({"reps": r, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


DATA_MEMORY_CHILD = r"""
import json, resource, sys
import torch
from dpfit.data.datamodule import DeepmdDataModule
from dpfit.model import EnergyModel
from dpfit.training.loss import EnergyLoss
from dpfit.data.batch import model_inputs
root, steps, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = EnergyModel.from_config(config)  # (on CPU, with config["kernels"])
dm = DeepmdDataModule(train_systems=[root], type_map=config["type_map"], rcut=config["descriptor"]["rcut"],
                      sel=config["descriptor"]["sel"], batch_size=1, data_stat_nbatch=2)
dm.setup("fit")
loss_fn, opt = EnergyLoss(), torch.optim.Adam(model.parameters(), 1e-3)
for k, batch in enumerate(dm.train_dataloader()):
    out = model(**model_inputs(batch), do_force=True, create_graph=True)
    loss, _ = loss_fn(out, batch, 1.0)
    opt.zero_grad(); loss.backward(); opt.step()
    if k + 1 == steps:
        break
frames = sum(len(v.indices) for v in dm.train_views)
print(json.dumps({"frames": frames, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_data_memory(data: Path, replicas: int, kernels: str, steps: int = 20) -> list[dict]:
    """Peak memory of a short training run through the DataModule on the data and on ``replicas``
    copies of it (fresh process each): frames are memory-mapped and read on demand, so it stays flat."""
    import shutil
    import subprocess
    import sys
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, replicas):
            root = Path(tmp) / f"x{n}"
            for k in range(n):
                for system in sorted(p.parent for p in Path(data).rglob("type.raw")):
                    shutil.copytree(system, root / f"copy{k}" / system.name)
            proc = subprocess.run([sys.executable, "-c", DATA_MEMORY_CHILD, str(root), str(steps),
                                   json.dumps({**WATER_CONFIG, "precision": "float64", "kernels": kernels})],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                rows.append({"replicas": n, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append({"replicas": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


def probe_backend(device: torch.device, args: argparse.Namespace) -> str:
    """The backend the measured models run on."""
    from dpfit.model.backends import choose_backend

    return args.backend or choose_backend(args.kernels, device)


def run(args: argparse.Namespace) -> dict:
    """All measurements -> ``results`` (plain dict, JSON-serialisable)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "keep" if args.malloc == "keep" and keep_freed_memory() else "default"  # as train.py does
    if args.ckpt == "fresh":
        ckpt = None
    else:
        ckpt = Path(args.ckpt) if args.ckpt else (WATER_CKPT if WATER_CKPT.is_file() else None)
    probe = build_model(ckpt, "float64", torch.device("cpu"))
    frames = pick_frames(Path(args.data), probe.type_map, args.frames)
    natoms = sorted({s.natoms for s, _ in frames})
    results: dict = {
        "setup": {"data": str(args.data), "ckpt": str(ckpt) if ckpt else "fresh water model (random weights)",
                  "frames": len(frames), "natoms": natoms, "batch_size": args.batch_size, "device": str(device),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                  "backend": probe_backend(device, args), "malloc": malloc,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    nl_result, samples = bench_neighbor_list(frames, probe.rcut, probe.sel)
    results["neighbor_list"] = nl_result
    for sample in samples:  # as FrameDataset's samples: collate adds the index facts
        sample["sel"] = probe.sel
    if args.facts == "pipeline":
        results["index_facts"] = bench_facts(samples, args.batch_size, probe.sel)
    results["setup"].update(facts=args.facts, compile=args.compile)
    for precision in args.precisions:
        dtype = getattr(torch, precision)
        results[f"matmul_{precision}"] = bench_matmul(dtype, device)
        model = build_model(ckpt, precision, device, args.kernels, args.backend)
        batches = make_batches(samples, args.batch_size, device, args.facts == "pipeline")
        results[f"inference_{precision}"] = bench_inference(model, batches, device, args.warmup, args.repeat)
        if not args.no_train:
            model = build_model(ckpt, precision, device, args.kernels, args.backend)
            train = bench_train(model, batches, device, args.repeat, results[f"matmul_{precision}"]["gflops"],
                                args.compile)
            # the machine's rate once more after the steps: a neighbour's load during one measurement
            # would lower the FLOP limit's rate (and flatter the step); the larger of the two counts
            again = bench_matmul(dtype, device)["gflops"]
            if again > results[f"matmul_{precision}"]["gflops"]:
                results[f"matmul_{precision}"]["gflops"] = again
                train["flop_limit_s"] = train["gflop_per_step"] / again
                train["x_flop_limit"] = train["seconds"] / train["flop_limit_s"]
            results[f"train_{precision}"] = train
    if args.data_memory:
        results["data_memory"] = bench_data_memory(Path(args.data), args.data_memory, args.kernels)
    if args.scaling:
        data0 = sorted(p.parent for p in Path(args.data).rglob("type.raw"))[0]
        for precision in args.precisions:
            results[f"scaling_{precision}"] = bench_scaling(ckpt, data0, precision, args.scaling, args.scaling_train,
                                                                 device, args.kernels)
    return results


def print_table(results: dict) -> None:
    setup = results["setup"]
    print(f"# data {setup['data']}  ckpt {setup['ckpt']}")
    print(f"# {setup['frames']} frames of {setup['natoms']} atoms, batch {setup['batch_size']}, device "
          f"{setup['gpu'] or setup['device']}, torch {setup['torch']}, {setup['threads']} threads, "
          f"backend {setup.get('backend')}, malloc {setup.get('malloc', 'default')}")
    for name, res in results.items():
        if name.startswith("matmul_"):
            print(f"# {name}: {res['gflops']:.1f} GFLOP/s")
    print(f"{'measurement':<22}{'frames/s':>12}{'ms/frame':>12}{'seconds':>10}{'GFLOP/step':>12}{'x FLOP limit':>14}"
          f"{'peak MiB':>10}")
    for row in results.get("data_memory", []):
        print(f"# data x{row['replicas']}: " + (row["error"] if "error" in row else
              f"{row['frames']} training frames, peak {row['peak_mib']:.0f} MiB"))
    for name, res in results.items():
        if name.startswith("scaling_"):
            for row in res:
                if "error" in row:
                    print(f"# {name} x{row['reps']}^3: {row['error']}")
                else:
                    print(f"# {name} {row['natoms']:>6d} atoms: {row['seconds']:.3f} s, peak {row['peak_mib']:.0f} MiB, "
                          f"{row['kib_per_atom']:.1f} KiB/atom")
    for name, res in results.items():
        if name in ("setup", "data_memory") or name.startswith(("matmul_", "scaling_")):
            continue
        extra = ""
        if "gflop_per_step" in res:
            mem = res.get("max_memory_mib", res.get("max_rss_mib", float("nan")))
            extra = f"{res['gflop_per_step']:>12.2f}{res['x_flop_limit']:>14.1f}{mem:>10.0f}"
        print(f"{name:<22}{res['frames_per_s']:>12.2f}{res['ms_per_frame']:>12.2f}{res['seconds']:>10.3f}{extra}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(WATER_DATA), help="system folder(s) root (default: ../shared/data/water)")
    parser.add_argument("--ckpt", default=None, help="checkpoint; 'fresh': a new water model (default: the water fixture if present, else fresh)")
    parser.add_argument("--frames", type=int, default=16, help="frames to time (default 16)")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per model call (default 1)")
    parser.add_argument("--precisions", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed inference batches before timing (default 2; training: one untimed pass)")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes over the frames (averaged)")
    parser.add_argument("--kernels", default="auto", choices=["off", "auto", "on"],
                        help="compiled CPU kernels (dpfit.model.kernels; default auto, as training)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--malloc", default="keep", choices=["keep", "default"],
                        help="keep: glibc malloc keeps freed memory, as train.py does (keep_freed_memory: true); "
                             "default: glibc's defaults")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    parser.add_argument("--facts", default="pipeline", choices=["pipeline", "model"],
                        help="index facts computed with the batch, as in training (default), or by the model each step")
    parser.add_argument("--backend", default=None, choices=["kernels", "compact", "static"],
                        help="the model's backend (dpfit.model.backends; default: selected for the device from --kernels)")
    parser.add_argument("--compile", action="store_true",
                        help="training step's loss and backward through torch.compile (inductor, full graph)")
    parser.add_argument("--scaling", type=int, nargs="*", default=[],
                        help="supercell replications to measure, e.g. --scaling 1 2 4 (192, 1536, 12288 water atoms)")
    parser.add_argument("--scaling-train", action="store_true", help="supercells: time a training-style pass")
    parser.add_argument("--data-memory", type=int, default=0, metavar="N",
                        help="peak memory of 20 training steps on the data and on N copies of it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

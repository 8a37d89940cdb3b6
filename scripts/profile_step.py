"""Where a training step's time goes: torch.profiler over a few water training steps.

    python scripts/profile_step.py                          # float64, ops sorted by self CPU time
    python scripts/profile_step.py --precision float32 --shapes --rows 40
    python scripts/profile_step.py --backward               # the autograd backward nodes only
    python scripts/profile_step.py --kernels off            # without the compiled CPU kernels

Uses the same step as ``scripts/benchmark.py`` (energy + force loss, Adam) on the first water frame
(the DeePMD-kit fixture's model when ../shared is there, else a fresh water model).
"""

from __future__ import annotations

import argparse
import time

import torch
from benchmark import WATER_CKPT, WATER_DATA, build_model, pick_frames, train_step_fn

from dpfit.data.batch import collate, make_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float64", choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    parser.add_argument("--rows", type=int, default=30, help="rows of the table (default 30)")
    parser.add_argument("--shapes", action="store_true", help="group the ops by input shapes")
    parser.add_argument("--backward", action="store_true", help="only the autograd backward nodes")
    parser.add_argument("--kernels", default="auto", choices=["off", "auto", "on"], help="compiled CPU kernels")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    ckpt = WATER_CKPT if WATER_CKPT.exists() else None
    model = build_model(ckpt, args.precision, torch.device("cpu"), args.kernels)
    (system, index), = pick_frames(WATER_DATA, model.type_map, 1)
    step = train_step_fn(model, collate([make_sample(system, index, model.rcut, model.sel)]))
    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"# {args.precision}, {args.threads} threads: median step {sorted(times)[5] * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f} ms); table totals cover {args.steps} steps")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages(group_by_input_shape=args.shapes)
    if args.backward:
        events = [e for e in events if e.key.startswith("autograd::engine::evaluate_function")]
        for e in sorted(events, key=lambda e: -e.cpu_time_total)[: args.rows]:
            print(f"{e.cpu_time_total / 1e3 / args.steps:9.2f} ms/step  {e.key.split(': ', 1)[-1]}")
        return
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_shapes_column_width=60))


if __name__ == "__main__":
    main()

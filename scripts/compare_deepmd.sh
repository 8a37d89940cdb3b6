#!/bin/sh
# Side by side on this machine, in one go: DeePMD-kit 3.2.0 (peer venv) and dpfit training the water
# se_e2_a example (float64, batch 1, decay_steps 100) for STEPS steps; prints both s/step and the ratio.
#   ../shared/tools/peer_deepmd.sh setup      # once
#   sh scripts/compare_deepmd.sh 300
set -e
n=${1:-300}
here=$(cd "$(dirname "$0")/.." && pwd)
shared=$here/../shared
peer=$(sh "$shared/tools/peer_deepmd.sh" train "$n" | grep "average training time" | grep -oE "[0-9]+\.[0-9]+" | head -1)
run=$(mktemp -d)
python "$here/train.py" experiment=water_se_e2_a paths.data_root="$shared/data/water" trainer.max_steps="$n" \
  schedule.decay_steps=100 hydra.run.dir="$run" +callbacks.timer._target_=dpfit.training.callbacks.StepTimer \
  summary=false > "$run/stdout.log" 2>&1
ours=$(python -c "import json; print(json.load(open('$run/timing.json'))['s_per_step'])")
python -c "print(f'DeePMD-kit: {float($peer):.4f} s/step   dpfit: {float($ours):.4f} s/step   speed-up: {float($peer)/float($ours):.2f}x')"

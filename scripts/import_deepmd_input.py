"""Translate a DeePMD-kit input.json into a dpfit experiment preset (YAML on stdout).

    python scripts/import_deepmd_input.py input.json > configs/experiment/mine.yaml
    python train.py experiment=mine

    # systems written as ${paths.data_root}/... (portable), data_root as written in input.json:
    python scripts/import_deepmd_input.py examples/water/se_e2_a/input.json --data-root ../data \
        > configs/experiment/water_imported.yaml
    python train.py experiment=water_imported paths.data_root=examples/water/data

Every key that could not be translated is printed on stderr as ``unsupported: <key>`` (exit status 0;
1 with --strict); ``_comment*`` keys are ignored. Relative system paths are resolved against the json's
folder (or --base-dir) and written absolute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpfit.io.deepmd_input import UnimplementedTypeError, convert_input, to_yaml


def _systems(preset: dict) -> list[str]:
    data = preset.get("data", {})
    return [*data.get("train_systems", []), *(data.get("val_systems") or [])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_json", help="DeePMD-kit input.json")
    p.add_argument("--base-dir", default=None, help="folder relative system paths start from (default: the json's)")
    p.add_argument("--data-root", default=None,
                   help="systems under this folder (relative to the base dir, or absolute) are written as "
                        "${paths.data_root}/...")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a key is unsupported")
    args = p.parse_args(argv)
    path = Path(args.input_json)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    base = Path(args.base_dir) if args.base_dir else path.resolve().parent
    try:
        preset, unsupported = convert_input(data, base_dir=base, data_root=args.data_root)
    except UnimplementedTypeError as exc:  # it would translate into a different model
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(preset, source=str(path)))
    for key in unsupported:
        print(f"unsupported: {key}", file=sys.stderr)
    for system in _systems(preset):
        if not system.startswith("${") and not Path(system).exists():
            print(f"warning: system {system} does not exist", file=sys.stderr)
    return 1 if unsupported and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python freeze.py ckpt_path=... output=model.pth [format=dpfit|lammps|deepmd]``: export a trained model."""

from __future__ import annotations

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.errors import one_line_errors, run_cli
from dpfit.cli.validate import validate_freeze_config
from dpfit.io.freeze_formats import CompressOptions, freeze_checkpoint
from dpfit.model.backends import choose_backend, library_path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="freeze")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    validate_freeze_config(cfg)  # precision, format, min_nbor_dist: one line naming the key, exit 2
    fmt = str(cfg.get("format", "dpfit"))
    kernels = fmt != "deepmd" and choose_backend(str(cfg.get("kernels", "auto")), "cpu") == "kernels"
    compress = None
    if bool(cfg.get("compress", False)):
        compress = CompressOptions(**{k: v for k, v in dict(cfg.get("compression") or {}).items()})
    out, model = freeze_checkpoint(to_absolute_path(cfg.ckpt_path), to_absolute_path(cfg.output), fmt=fmt,
                                   precision=cfg.get("precision"), overwrite=bool(cfg.get("overwrite", False)),
                                   min_nbor_dist=cfg.get("min_nbor_dist"), kernels=kernels, compress=compress)
    print(f"{fmt} model written to {out} (type_map {model.type_map}, rcut {model.rcut} Å)")
    if compress is not None:
        print("\n".join(model.compression.summary()))
    if kernels:
        host = ("LAMMPS: DP_PLUGIN_PATH=/path/to/libdpfit_ops.so lmp ..., the library built for LAMMPS's torch "
                "(scripts/build_ops_library.sh, docs/lammps.md)" if fmt == "lammps" else
                "torch.ops.load_library('/path/to/libdpfit_ops.so') before torch.jit.load")
        print(f"its CPU path calls dpfit's op library (built here: {library_path()}): load it first ({host}); "
              "kernels=off writes a file that needs none")


def main() -> None:
    """``freeze.py`` / ``dpfit-freeze``: expected errors end in one ``error: ...`` line (dpfit.cli.errors)."""
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()

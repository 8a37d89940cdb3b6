"""``python freeze.py ckpt_path=... output=model.pth``: export a TorchScript model."""

from __future__ import annotations

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.errors import one_line_errors, run_cli
from dpfit.io.checkpoint import load_model
from dpfit.io.export import freeze


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="freeze")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    model = load_model(to_absolute_path(cfg.ckpt_path), precision=cfg.get("precision"), impl="fast")
    out = freeze(model, to_absolute_path(cfg.output), overwrite=bool(cfg.get("overwrite", False)))
    print(f"frozen model written to {out} (type_map {model.type_map}, rcut {model.rcut} Å)")


def main() -> None:
    """``freeze.py`` / ``dpfit-freeze``: expected errors end in one ``error: ...`` line (dpfit.cli.errors)."""
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()

"""Where the Hydra configs live: ``configs/`` of the repository (or $DPFIT_CONFIG_DIR); the configs' resolvers."""

import os
from pathlib import Path

from dpfit.cli import resolvers

CONFIG_DIR = os.environ.get("DPFIT_CONFIG_DIR") or str(Path(__file__).resolve().parents[3] / "configs")

resolvers.register()

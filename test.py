"""Evaluate a checkpoint on systems as DeePMD-kit's ``dp test`` does (Hydra config: configs/test.yaml)."""

from dpfit.cli.test import main

if __name__ == "__main__":
    main()

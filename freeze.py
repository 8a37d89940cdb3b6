"""Export a trained model to TorchScript: ``python freeze.py ckpt_path=... output=model.pth``."""

from dpfit.cli.freeze import main

if __name__ == "__main__":
    main()

"""Train a Deep Potential: ``python train.py [group=option ...] [key=value ...]`` (see README)."""

from dpfit.cli.train import main

if __name__ == "__main__":
    main()

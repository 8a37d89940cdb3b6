"""Hydra entry points behind train.py, test.py and freeze.py."""

import os
import warnings

# quiet third-party noise that says nothing about the user's run
os.environ.setdefault("LITLOGGER_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")

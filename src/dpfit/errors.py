"""Expected errors: bad configs, checkpoints, run folders, diverged training.

Each carries a message that names the file or config key, the problem and the fix, on one line, and the
exit code of the command line (``train.py``, ``test.py``, ``freeze.py`` print ``error: <message>`` and exit
with it; see :mod:`dpfit.cli.errors`). Raise them anywhere; the data reader's ``DataError``
(:mod:`dpfit.data.system`) is reported the same way.

Exit codes: 1 bad input (data, checkpoint, run folder, file system) or a diverged run, 2 a config or
command-line error, 128 + signal number for a run stopped by a signal (143 for SIGTERM).
"""

from __future__ import annotations


class DpfitError(Exception):
    """An expected error: ``str(error)`` is the one-line message for the user."""

    exit_code = 1


class ConfigError(DpfitError, ValueError):
    """A config value or command-line override is wrong; the message names the key (``trainer.max_steps``)."""

    exit_code = 2


class CheckpointError(DpfitError, ValueError):
    """A checkpoint cannot be read, or does not match the config it is resumed with."""


class RunFolderError(DpfitError):
    """A run folder that holds another run, is in use by a running process, or cannot be written."""


class NonFiniteLossError(DpfitError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step, the batch and the loss term."""


class Preempted(DpfitError):
    """The run was stopped by a signal (SIGTERM, SIGUSR1) after saving a checkpoint at the current step."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)

"""Run folders are never overwritten: a fresh run into a folder that holds a run is refused, and a lock
file (``<run folder>/.dpfit.lock``: pid and host) refuses a second process training into the same folder.

The lock is released when the run ends, however it ends; a lock left by a killed run (its pid is no longer
alive on this host) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from dpfit.errors import RunFolderError

log = logging.getLogger("dpfit.train")

LOCK = ".dpfit.lock"
#: seconds after which an empty or unreadable lock file is taken to be left by a killed process
GARBAGE_LOCK_AGE = 2.0


def _read_lock(path: Path) -> dict | None:
    """The lock's holder ({pid, host, started}); None for an empty or garbage file."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder.get("host") else None


def _rows(path: Path) -> int:
    try:
        with open(path) as fh:
            return sum(1 for line in fh if line.strip() and not line.startswith("#"))
    except OSError:
        return 0


def holds_run(folder: Path) -> list[str]:
    """What an earlier training run left in ``folder`` that a new run would overwrite: checkpoints,
    learning-curve or CSV rows (empty when there is none; a run that failed before its first row or
    checkpoint leaves nothing to lose)."""
    found = []
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        found.append("checkpoints/")
    found += sorted(p.name for p in folder.glob("hpc_ckpt_*.ckpt"))
    if _rows(folder / "lcurve.out") > 0:
        found.append("lcurve.out")
    if any(_rows(p) > 1 for p in folder.glob("csv/metrics*.csv")):
        found.append("csv/metrics.csv")
    return found


def refuse_fresh_run(folder: Path, resuming_from: str | None) -> None:
    """A run that does not resume this folder's own checkpoint must start in an empty folder."""
    found = holds_run(folder)
    if not found:
        return
    if resuming_from is not None:
        try:
            Path(resuming_from).resolve().relative_to(folder.resolve())
            return  # continuing this folder's run
        except ValueError:
            what = f"resuming {resuming_from} into it"
    else:
        what = "a new run"
    raise RunFolderError(
        f"run folder {folder} already holds a run ({', '.join(found[:4])}); {what} would overwrite it: continue "
        f"that run with ckpt_path=last, or give a new folder (hydra.run.dir=<new folder>, or leave it out)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dpfit-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"run folder {folder} cannot be written ({exc.strerror or exc}): choose a writable "
                             "folder with hydra.run.dir=<folder>") from exc


@contextlib.contextmanager
def run_folder_lock(folder: Path):
    """Hold ``<folder>/.dpfit.lock`` for the duration of the block (see the module docstring)."""
    folder = Path(folder)
    _check_writable(folder)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(40):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:  # empty or not a dpfit lock
                try:
                    age = time.time() - path.stat().st_mtime
                except OSError:
                    continue  # removed meanwhile: try again
                if age < GARBAGE_LOCK_AGE:  # another process may be between creating and writing it
                    time.sleep(0.1)
                    continue
                log.warning("run folder %s: the lock file %s is empty or not a dpfit lock (left by a process "
                            "killed while taking it?): taken over", folder, path)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                log.warning("run folder %s: taking over the lock of process %d, which is no longer running", folder, pid)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            who = f"process {pid} on {host}" + (f" (since {holder['started']})" if holder.get("started") else "")
            raise RunFolderError(
                f"run folder {folder} is in use by {who}: wait for it to end or give another folder "
                f"(hydra.run.dir=<folder>); if no such process runs, delete {path}") from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise RunFolderError(f"run folder {folder} cannot be written ({exc.strerror}): choose a writable "
                                     "folder with hydra.run.dir=<folder>") from exc
            raise
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise RunFolderError(f"run folder {folder}: cannot take the lock {path}; delete it if no run uses the folder")
    try:
        yield path
    finally:
        try:
            holder = json.loads(path.read_text() or "{}")
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                path.unlink()
        except (OSError, ValueError):
            pass

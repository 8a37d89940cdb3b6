"""One ``error: ...`` line for every expected error of ``train.py``, ``test.py`` and ``freeze.py``.

:func:`run_cli` runs a Hydra entry point with Hydra's own error printing off (``HYDRA_FULL_ERROR=1`` in
this process makes Hydra re-raise), turns an expected error (:class:`dpfit.errors.DpfitError`, the data
reader's ``DataError``, a config composition or interpolation error, a ``ValueError`` raised on bad input,
a file-system error) into one line on stderr and exits with its code. Misspelt keys and group options get
a "did you mean". Anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` or ``verbose=true``
on the command line print the traceback of expected errors too.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable

from dpfit.errors import ConfigError, DpfitError

CONFIG_EXIT = ConfigError.exit_code


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean `max_steps`?)`` for the closest of ``options``, else ``""``."""
    options = list(dict.fromkeys(str(o) for o in options if not str(o).startswith("_")))
    close = difflib.get_close_matches(word, options, n=2, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[o] for o in difflib.get_close_matches(word.lower(), list(lowered), n=2, cutoff=0.6)]
    return f" (did you mean `{'` or `'.join(close)}`?)" if close else ""


def _first_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[:1]).strip() or text.__class__.__name__


def missing_value_message(text: str) -> str | None:
    """``data.sel is not set: ...`` for an OmegaConf "Missing mandatory value: data.sel" message."""
    marker = "Missing mandatory value: "
    if marker not in text:
        return None
    key = text.split(marker, 1)[1].split()[0].rstrip(".,")
    return f"{key} is not set (??? in the config): give it on the command line, {key}=..."


def _omegaconf_message(exc) -> str:
    """One line for an OmegaConf error: its message's first line and the key it concerns."""
    missing = missing_value_message(str(exc))
    if missing:
        return missing
    msg = _first_line(getattr(exc, "msg", None) or str(exc))
    key = getattr(exc, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def _composition_message(exc) -> str:
    """One line for a Hydra composition error (unknown key or group option, bad override syntax)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, MissingConfigException):
        missing = str(getattr(exc, "missing_cfg_file", "") or "")
        options = list(getattr(exc, "options", None) or [])
        if "/" in missing and options:
            group, choice = missing.rsplit("/", 1)
            return (f"{group}={choice}: no such option in config group `{group}`{did_you_mean(choice, options)}; "
                    f"options: {', '.join(options)}")
        return _first_line(str(exc).replace("In 'train': ", ""))
    if isinstance(exc, OverrideParseException):
        override = getattr(exc, "override", "")
        return f"cannot parse the override `{override}` (key=value; quote values with spaces or special characters)"
    cause = exc.__cause__
    if isinstance(cause, ConfigKeyError) or type(cause).__name__ == "ConfigAttributeError":
        key, full_key, parent = cause.key, cause.full_key, cause.parent_node
        options = list(parent.keys()) if parent is not None and hasattr(parent, "keys") else []
        if full_key and "." not in str(full_key):
            options = [o for o in options if o != "hydra"] + _group_names()
        group = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
        where = f"config group `{group}`" if group else "the config"
        return f"{full_key}: no such key in {where}{did_you_mean(str(key), options)} (a new key needs +{full_key}=...)"
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf_message(cause)
    text = str(exc)
    if "No match in the defaults list" in text:  # a group override for a group the config does not use
        name = text.split("'")[1] if "'" in text else text
        return f"{name}: no such config group{did_you_mean(name.split('/')[-1], _group_names())}"
    return _first_line(text)


def _group_names() -> list[str]:
    """The config groups of the configs folder (data, model, trainer, ...)."""
    from dpfit.cli.config_dir import CONFIG_DIR

    try:
        return sorted(e.name for e in os.scandir(CONFIG_DIR) if e.is_dir())
    except OSError:
        return []


def _instantiation_group(exc) -> str | None:
    """The config group (``data``, ``loss``) whose ``_target_`` raised, from Hydra's InstantiationException."""
    text = str(exc)
    marker = "full_key: "
    return text.rsplit(marker, 1)[1].split()[0] if marker in text else None


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) of an expected error; None for anything else (a bug: keep the traceback)."""
    from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from dpfit.data.system import DataError

    if isinstance(exc, DpfitError):
        return _first_line(str(exc)), exc.exit_code
    if isinstance(exc, DataError):
        return _first_line(str(exc)), 1
    if isinstance(exc, (ConfigCompositionException, OverrideParseException)):
        return _composition_message(exc), CONFIG_EXIT
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__
        inner = describe(cause) if cause is not None else None
        group = _instantiation_group(exc)
        if inner is not None:
            return inner
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            name = str(cause).rsplit("'", 2)[-2] if str(cause).count("'") >= 2 else ""
            return f"{group}.{name}: not an option of {group}", CONFIG_EXIT
        if cause is not None and group:
            return f"{group}: {_first_line(str(cause))}", CONFIG_EXIT
        return None
    if isinstance(exc, OmegaConfBaseException):
        return _omegaconf_message(exc), CONFIG_EXIT
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        if exc.filename and exc.strerror:
            return f"{exc.filename}: {exc.strerror.lower()}", 1
        return _first_line(str(exc)), 1
    if isinstance(exc, OSError) and exc.filename and exc.errno is not None:
        return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}", 1
    cause = _os_error_in_chain(exc)
    if cause is not None:  # e.g. Hydra's "Unable to configure handler 'file'": a run folder that cannot be written
        return f"cannot write {cause.filename}: {(cause.strerror or str(cause)).lower()} (choose a writable run " \
               "folder with hydra.run.dir=<folder>)", 1
    if isinstance(exc, ValueError):  # raised on bad input throughout dpfit, with the key or file named
        return _first_line(str(exc)), 1
    return None


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    seen = set()
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.filename:
            return link
        link = link.__cause__ or link.__context__
    return None


def wants_traceback(argv: list[str]) -> bool:
    """``HYDRA_FULL_ERROR=1`` in the environment or ``verbose=true`` among the overrides."""
    if os.environ.get(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "")) not in ("", "0"):
        return True
    return any(a.lstrip("+~").lower() in ("verbose=true", "verbose=1", "verbose=yes") for a in argv)


def _report(exc: BaseException, verbose: bool) -> None:
    """Print the one-line report of an expected error and exit with its code; return for anything else."""
    reported = describe(exc)
    if reported is None:
        return
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    message, code = reported
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code) from None


def one_line_errors(task: Callable) -> Callable:
    """Wrap a Hydra task function: an expected error exits with one ``error: ...`` line from inside the job
    (before Hydra adds its own "Error executing job" line). Multirun jobs raise as before, so a sweep records
    the failed job and goes on."""
    import functools

    @functools.wraps(task)
    def wrapped(cfg):
        try:
            return task(cfg)
        except Exception as exc:
            if not _multirun():
                _report(exc, _verbose_now(cfg))
            raise

    return wrapped


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().get("mode") == RunMode.MULTIRUN


def _verbose_now(cfg) -> bool:
    if os.environ.get(_USER_FULL_ERROR, "") not in ("", "0"):
        return True
    try:
        return bool(cfg.get("verbose", False))
    except Exception:  # noqa: BLE001
        return False


#: the user's own HYDRA_FULL_ERROR, kept while run_cli sets it for Hydra
_USER_FULL_ERROR = "DPFIT_USER_HYDRA_FULL_ERROR"


def run_cli(entry: Callable[[], object], argv: list[str] | None = None) -> None:
    """Run a Hydra entry point; expected errors end in one ``error: ...`` line and their exit code."""
    argv = sys.argv[1:] if argv is None else argv
    first = _USER_FULL_ERROR not in os.environ
    if first:  # child processes (DDP ranks) inherit the first process's choice
        os.environ[_USER_FULL_ERROR] = os.environ.get("HYDRA_FULL_ERROR", "")
    verbose = wants_traceback(argv)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        entry()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        _report(exc, verbose)
        raise
    finally:
        user = os.environ.get(_USER_FULL_ERROR, "")
        if user:
            os.environ["HYDRA_FULL_ERROR"] = user
        else:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        if first:
            os.environ.pop(_USER_FULL_ERROR, None)

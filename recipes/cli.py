"""Command-line plumbing of ``dkm-palett-train`` around Hydra: override keys checked before Hydra composes the config,
output folders checked before Hydra creates them, and what a failed run leaves behind (one error line on stderr,
the traceback in ``train.log``, no folder at all for a config error)."""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback

from dkm_palett.io import ensure_writable_dir


def print_error(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def check_override_keys(argv: Iterable[str]) -> None:
    """``palettization.<key>=...`` with a key that is no ``ModuleDKMPalettizerConfig`` field: the project's
    "unknown key (did you mean ...)" error at once, instead of Hydra's advice to add it with ``+``."""
    from dkm_palett.recipes.config import field_names
    from dkm_palett.validation import check_keys

    keys = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        path = arg.split("=", 1)[0].lstrip("+~").split(".")
        if len(path) == 2 and path[0] == "palettization":
            keys[path[1]] = None
    check_keys("palettization", keys, field_names())


def _check_or_exit(path: Any, field: str) -> None:
    try:
        ensure_writable_dir(str(path), field)
    except ValueError as err:
        print_error(str(err))
        sys.exit(2)


class CheckOutputDir(Callback):
    """Hydra callback (``hydra.callbacks`` in config.yaml): the run or sweep folder must be writable, else one
    ``error:`` line naming ``hydra.run.dir`` / ``hydra.sweep.dir`` and exit status 2."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _check_or_exit(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _check_or_exit(config.hydra.sweep.dir, "hydra.sweep.dir")


def _run_logs(run_dir: Path) -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir]


def _holds_only_hydra_files(run_dir: Path) -> bool:
    return all(p.is_dir() or p.name == "train.log" or ".hydra" in p.relative_to(run_dir).parts
               for p in run_dir.rglob("*"))


def record_failure(run_dir: Path, err: BaseException, config_error: bool) -> None:
    """A config error (nothing ran) removes the run folder Hydra made; any other error goes into its log files."""
    run_dir = Path(run_dir)
    if config_error and run_dir.is_dir() and _holds_only_hydra_files(run_dir):
        for handler in _run_logs(run_dir):
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    record = logging.makeLogRecord({"name": "dkm-palett-train", "levelno": logging.ERROR, "levelname": "ERROR",
                                    "msg": f"run failed: {type(err).__name__}: {err}\n{text}"})
    for handler in _run_logs(run_dir):
        handler.emit(record)
        handler.flush()

"""What each notebook does after its set-up cell: check its parameters, mount Drive in Colab, open the named run.

    check_parameters(globals(), _names_before_parameters)   # a misspelt parameter fails, naming it
    cfg = open_run(profile, run_name, overrides)                     # the run every notebook finds

A run lives in ``cfg.home_dir()``: ``MyDrive/senri/<run_name>`` when Drive is mounted in Colab (or
``experiment.drive_dir``, which stands in for it anywhere), else ``runs/<run_name>`` on this machine. In Colab the
Drive mount is asked for once per runtime; declined or unavailable, the run stays on the runtime's disk, with a
one-line warning.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..training.config import SECTIONS, ConfigManager, check_identity, drive_root, model_runs

NOTEBOOK_PARAMETERS = ("profile", "run_name", "overrides")


def in_colab() -> bool:
    """True inside a Colab runtime (which imports ``google.colab`` before any cell runs)."""
    return "google.colab" in sys.modules


def check_parameters(namespace: Mapping[str, Any], before: Iterable[str],
                     declared: Iterable[str] = NOTEBOOK_PARAMETERS) -> None:
    """Raise if the notebook's parameter cells (its own and the one papermill injects) assigned a name that it does
    not declare: a misspelt or unsupported parameter would otherwise be ignored. ``namespace`` is the notebook's
    ``globals()``, ``before`` the names defined before the parameters cell (private ``_names`` are not checked)."""
    declared, seen = list(declared), set(before)
    unknown = sorted(name for name, value in namespace.items() if name not in seen and name not in declared
                     and not name.startswith("_") and not inspect.ismodule(value) and not callable(value))
    if not unknown:
        return
    owners = {f: f"{section}.{f}" for section, cls in SECTIONS.items() for f in cls.__dataclass_fields__}
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, declared, n=1)
        key = difflib.get_close_matches(name, list(owners), n=1, cutoff=0.8)
        if close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
        elif key:
            hints.append(f"{name!r}: the config key {owners[key[0]]!r} is set with overrides={{{owners[key[0]]!r}: ...}}")
    raise NameError(
        f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {unknown}; this notebook's parameters are "
        f"{declared}" + (f" ({'; '.join(hints)})" if hints else "")
        + ". Any config key is set through overrides, e.g. overrides={'training.max_steps': 30}"
    )


def parse_overrides(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``overrides`` as a dict: a mapping, None (no overrides), or its JSON/YAML text (``papermill -p overrides``
    passes a string)."""
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = yaml.safe_load(overrides) if overrides.strip() else {}
        except yaml.YAMLError as error:
            raise ValueError(f"parameter overrides = {overrides!r} is not a JSON/YAML mapping: {error}") from None
    if not isinstance(overrides, Mapping):
        raise ValueError(f"parameter overrides must be a dict of dotted config keys, e.g. "
                         f"{{'training.max_steps': 30}}; got {type(overrides).__name__} {overrides!r}")
    return dict(overrides)


def mount_drive() -> Path | None:
    """In Colab, mount Google Drive (once per runtime) and return ``MyDrive``; outside Colab None. Declined or
    failing, it prints one warning line and returns None: the run then stays on the runtime's disk."""
    if drive_root().is_dir():
        return drive_root()
    if not in_colab():
        return None
    try:
        from google.colab import drive

        drive.mount(str(drive_root().parent))
    except Exception as error:  # declined in the dialog, no credentials, timed out: Colab raises several kinds
        print(f"WARNING: Google Drive is not mounted ({type(error).__name__}: {error}); this run stays on the "
              "runtime's disk (runs/<run_name>) and is lost with the runtime", file=sys.stderr, flush=True)
        return None
    return drive_root() if drive_root().is_dir() else None


def open_run(profile: str = "auto", run_name: str | None = None,
             overrides: Mapping[str, Any] | str | None = None) -> ConfigManager:
    """The configuration of the named run (``run_name`` None: the profile's name), with Drive mounted first in
    Colab. Raises, naming the keys and both values, when the run already exists with other identity settings
    (``ConfigManager.identity``). Prints where the run lives."""
    if not isinstance(profile, str):
        raise ValueError(f"parameter profile must be a string, got {type(profile).__name__} {profile!r}")
    if run_name is not None and not isinstance(run_name, str):
        raise ValueError(f"parameter run_name must be a string or None, got {type(run_name).__name__} {run_name!r}")
    merged = parse_overrides(overrides)
    if run_name is not None:
        merged["experiment.run_name"] = run_name
    mount_drive()
    cfg = ConfigManager(profile, merged)
    for run_cfg in model_runs(cfg).values():
        for where in {Path(run_cfg.experiment.run_dir), run_cfg.home_dir()}:
            check_identity(run_cfg, where / "config.yaml")
    where = "on Drive" if cfg.resolve_drive_dir() is not None else "on this machine's disk"
    print(f"run {cfg.experiment.run_name!r} (profile {cfg.profile}) lives {where}: {cfg.home_dir().resolve()}")
    return cfg


__all__ = ["NOTEBOOK_PARAMETERS", "in_colab", "check_parameters", "parse_overrides", "mount_drive", "open_run"]

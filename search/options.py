"""The options of one search, resolved once and saved with it.

`SearchOptions` is what `esc50 search` parses and what `esc50 main` builds in Python. Unset
fields (None) are filled by `resolve()`: smoke defaults, the shards of the default features,
absolute local paths, the tracking URI from the environment. The resolved options are saved as
JSON beside Tune's results (`<storage>/<name>/esc50_search.json`, read back by `--resume NAME`)
and as the MLflow params of the search's parent run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from search.errors import UserError
from search.store import tracking_uri
from trainable.config import PRESETS
from trainable.protocol import FOLDS, check_folds

SAMPLERS = ("tpe", "random", "cmaes")
FOLD_LAYOUTS = ("auto", "workers", "packed")  # trainable/layout.py's LAYOUTS (not imported: kept light)
DEFAULT_STORAGE = "runs"
DEFAULT_EXPERIMENT = "esc50"
# The tiny model of `--smoke`: the smoke preset's model (the space's other keys are kept).
SMOKE_MODEL = {k: PRESETS["smoke"][k] for k in ("arch", "width", "depth", "batch_size", "device")}
SMOKE_MODEL["eval_crops"] = 0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class SearchOptions:
    """Every option of a search. None = not given: `resolve()` fills it."""

    name: str | None = None  # the search: Tune experiment dir name, MLflow parent run name, tag esc50.search
    space: str = "default"  # a named space or path/to/file.py[:function]
    trials: int | None = None  # default 20 (smoke: 2)
    epochs: int | None = None  # overrides the space's epochs (smoke: 2)
    folds: tuple[int, ...] | None = None  # official folds to cross-validate (default all 5; smoke: 1, 2)
    cpus_per_fold: float | None = None  # default 1 (smoke: 0.5)
    gpus_per_fold: float = 0.0
    fold_layout: str = "auto"  # auto | workers | packed (trainable/layout.py); saved, so a resume keeps it
    shards: str | None = None  # default: data/shards/<digest of the default features>
    address: str | None = None  # Ray: None = a local Ray on loopback; "auto" or host:port connects
    storage: str | None = None  # Tune storage: a local dir (default ./runs) or a URI (s3://, file://)
    tracking_uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment
    seed: int = 0
    sampler: str = "tpe"  # tpe | random | cmaes
    asha: bool = True
    grace_period: int | None = None  # epochs before ASHA may stop a trial (default ~epochs/8, >= 1)
    reduction_factor: float = 3.0
    concurrency: int | None = None  # trials at once (default: as many as the Ray cluster fits)
    max_failures: int = 2  # retries of a failed trial, from its latest checkpoint
    smoke: bool = False
    startup_trials: int | None = None  # TPE's random trials first (default: trials // 4, 3..10)
    optuna_storage: str | None = None  # the study's storage URL (search/study.py; '' = in memory)
    verbose: int = 1  # 0: quiet, 1: a line per trial event and the summary, 2: Tune's table too
    # Filled by resolve() (recorded for the record and for resume):
    space_label: str | None = None  # the space as loaded (a user file: absolute path:function)
    created: str | None = None

    # ---- resolution ---------------------------------------------------------------------------
    def resolve(self) -> SearchOptions:
        """A copy with every default filled and every option checked (UserError naming the option)."""
        o = dataclasses.replace(self)
        if o.name is None:
            o.name = "search-" + time.strftime("%Y%m%d-%H%M%S")
        if not _NAME_RE.match(o.name):
            raise UserError(
                f"--name {o.name!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with '.')"
            )
        if o.trials is None:
            o.trials = 2 if o.smoke else 20
        if o.epochs is None and o.smoke:
            o.epochs = 2
        if o.folds is None:
            o.folds = (1, 2) if o.smoke else FOLDS
        o.folds = parse_folds(o.folds)
        if o.cpus_per_fold is None:
            o.cpus_per_fold = 0.5 if o.smoke else 1.0
        _positive("--trials", o.trials, integer=True)
        if o.epochs is not None:
            _positive("--epochs", o.epochs, integer=True)
        _positive("--cpus-per-fold", o.cpus_per_fold)
        if not isinstance(o.gpus_per_fold, (int, float)) or o.gpus_per_fold < 0:
            raise UserError(f"--gpus-per-fold {o.gpus_per_fold!r}: must be >= 0")
        o.fold_layout = str(o.fold_layout).lower()
        if o.fold_layout not in FOLD_LAYOUTS:
            raise UserError(f"--fold-layout {o.fold_layout!r}: not one of {', '.join(FOLD_LAYOUTS)}")
        if o.concurrency is None and o.smoke:
            o.concurrency = min(o.trials, 2)  # trial start-up dominates a smoke run: overlap two
        if o.concurrency is not None:
            _positive("--concurrency", o.concurrency, integer=True)
        if not isinstance(o.max_failures, int) or o.max_failures < 0:
            raise UserError(f"--max-failures {o.max_failures!r}: must be an integer >= 0")
        if o.grace_period is not None:
            _positive("--grace-period", o.grace_period, integer=True)
        if not isinstance(o.reduction_factor, (int, float)) or o.reduction_factor <= 1:
            raise UserError(f"--reduction-factor {o.reduction_factor!r}: must be > 1")
        if o.startup_trials is not None and (not isinstance(o.startup_trials, int) or o.startup_trials < 0):
            raise UserError(f"--startup-trials {o.startup_trials!r}: must be an integer >= 0")
        o.sampler = str(o.sampler).lower()
        if o.sampler not in SAMPLERS:
            raise UserError(f"--sampler {o.sampler!r}: not one of {', '.join(SAMPLERS)}")
        if o.sampler == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise UserError("--sampler cmaes needs the `cmaes` package (pip install cmaes)") from None
        if o.shards is None:
            from trainable.model.features import FeatureParams
            from trainable.shards import default_location

            o.shards = default_location(FeatureParams())
        o.shards = absolute(o.shards)
        o.storage = absolute(o.storage or DEFAULT_STORAGE)
        o.tracking_uri = tracking_uri(o.tracking_uri)
        from search.study import storage_url

        o.optuna_storage = storage_url(o.optuna_storage, o.tracking_uri, o.storage)
        if o.address is not None:
            o.address = str(o.address).strip()
            if o.address in ("", "local"):
                o.address = None
        if not o.experiment:
            raise UserError("--experiment: must not be empty")
        o.created = o.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return o

    # ---- what the search derives -------------------------------------------------------------
    def overrides(self) -> dict[str, Any]:
        """TrainConfig keys the options fix on top of the space."""
        out: dict[str, Any] = {}
        if self.smoke:
            out.update(SMOKE_MODEL)
        if self.epochs is not None:
            out["epochs"] = int(self.epochs)
        return out

    def grace(self, epochs: int) -> int:
        g = self.grace_period if self.grace_period is not None else max(1, round(epochs / 8))
        return max(1, min(int(g), int(epochs)))

    def n_startup_trials(self) -> int:
        if self.startup_trials is not None:
            return int(self.startup_trials)
        return max(3, min(10, int(self.trials or 0) // 4))

    # ---- saving ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["folds"] = list(self.folds) if self.folds is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        o = cls(**{k: v for k, v in d.items() if k in known})
        if o.folds is not None:
            o.folds = tuple(int(f) for f in o.folds)
        return o

    @classmethod
    def from_json(cls, text: str) -> SearchOptions:
        return cls.from_dict(json.loads(text))

    def mlflow_params(self) -> dict[str, str]:
        """Every option as an MLflow param (strings; None as '')."""
        out = {}
        for k, v in self.to_dict().items():
            if isinstance(v, list):
                v = ",".join(str(x) for x in v)
            out[k] = "" if v is None else str(v)
        return out


def parse_folds(folds: Any) -> tuple[int, ...]:
    """ "1,2" / [1, 2] -> (1, 2); UserError naming --folds otherwise."""
    parts = [p for p in re.split(r"[,\s]+", folds.strip()) if p] if isinstance(folds, str) else folds
    try:
        return check_folds(parts)
    except (TypeError, ValueError):
        raise UserError(f"--folds {folds!r}: folds are among {','.join(map(str, FOLDS))}") from None


def absolute(location: str) -> str:
    """A local path made absolute; a URI (scheme://...) unchanged."""
    location = str(location)
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def _positive(option: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and isinstance(value, int)
    if not ok:
        raise UserError(f"{option} {value!r}: must be {'an integer ' if integer else 'a number '}> 0")

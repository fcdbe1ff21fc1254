"""`esc50` command line: parses options and calls the module that does the work. No logic here.

Each subcommand has one `_add_<name>` function (its options) and one `_run_<name>` function (the
call into its module). User errors (`UserError`) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from search.errors import UserError

if TYPE_CHECKING:
    from trainable.features import FeatureParams

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# ---- prepare ---------------------------------------------------------------------------------
def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off", "") else float(text)


def add_feature_options(p: argparse.ArgumentParser) -> None:
    """Log-mel options (defaults: FeatureParams()); shared by every command that prepares data."""
    from trainable.features import STORAGE_DTYPES, FeatureParams

    d = FeatureParams()
    g = p.add_argument_group(
        "features (defaults are the product's; the seed's: --sample-rate 44100 --top-db none)"
    )
    g.add_argument("--sample-rate", type=int, default=d.sample_rate, help="Hz (default %(default)s)")
    g.add_argument("--n-fft", type=int, default=d.n_fft, help="default %(default)s")
    g.add_argument(
        "--hop", type=int, default=d.hop_length, help="hop length in samples (default %(default)s)"
    )
    g.add_argument("--n-mels", type=int, default=d.n_mels, help="default %(default)s")
    g.add_argument("--f-min", type=float, default=d.f_min, help="Hz (default %(default)s)")
    g.add_argument("--f-max", type=_optional_float, default=d.f_max, help="Hz, or none for Nyquist (default)")
    g.add_argument(
        "--log-floor", type=float, default=d.log_floor, help="power floor before dB (default %(default)s)"
    )
    g.add_argument(
        "--top-db",
        type=_optional_float,
        default=d.top_db,
        help="dB range kept per clip, or none (default %(default)s)",
    )
    g.add_argument(
        "--dtype", choices=STORAGE_DTYPES, default=d.storage_dtype, help="shard storage (default %(default)s)"
    )


def feature_params(args: argparse.Namespace) -> FeatureParams:
    """The FeatureParams named by `add_feature_options`; invalid combinations are a UserError."""
    from trainable.features import FeatureParams

    try:
        return FeatureParams(
            sample_rate=args.sample_rate,
            n_fft=args.n_fft,
            hop_length=args.hop,
            n_mels=args.n_mels,
            f_min=args.f_min,
            f_max=args.f_max,
            log_floor=args.log_floor,
            top_db=args.top_db,
            storage_dtype=args.dtype,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn ESC-50 audio into Parquet log-mel shards")
    p.add_argument(
        "--source",
        default=None,
        help="local ESC-50 copy (meta/esc50.csv + audio/), .zip archive or URL "
        "(default: $ESC50_SOURCE, else the official archive)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="dataset directory or URI: path, file://, s3://, gs:// (default: data/shards/<params digest>)",
    )
    add_feature_options(p)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default %(default)s)")
    p.add_argument(
        "--force", action="store_true", help="replace a dataset prepared with other parameters or audio"
    )
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from search.prepare import prepare

    prepare(args.source, args.out, feature_params(args), workers=args.workers, force=args.force)
    return 0


# ---- promote ---------------------------------------------------------------------------------
def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote", help="register the best trial of a search as the champion model (or roll back)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--search", help="search name (default: the most recent search)")
    which.add_argument("--run", dest="run_id", help="a trial's MLflow run id")
    which.add_argument("--trial", dest="trial_id", help="a Tune trial id")
    which.add_argument(
        "--rollback", action="store_true", help="move the champion alias back to the previous version"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument("--name", default="esc50-cnn", help="registered model name (default %(default)s)")
    p.add_argument("--shards", help="shards URI for the out-of-fold report (default: the search's)")
    p.set_defaults(func=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from search import promote, registry

    if args.rollback:
        champion, previous = registry.rollback(args.tracking_uri, args.name)
        print(f"{args.name}: champion is v{champion}, previous is {'v' + previous if previous else 'none'}")
        return 0
    result = promote.promote(
        args.search, args.run_id, args.trial_id, args.tracking_uri, args.name, args.shards
    )
    print(result.summary())
    return 0


# ---- predict ---------------------------------------------------------------------------------
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify audio files with the registered model")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    p.add_argument("--model", default="models:/esc50-cnn@champion", help="model URI (default %(default)s)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to show per file (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--allow-pickled",
        action="store_true",
        help="also load a model that holds pickled Python code (one promoted before models were "
        "logged as code); loading it runs that code: only for a registry you trust",
    )
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from search.predict import format_results, predict

    results = predict(args.files, args.model, args.tracking_uri, args.top_k, args.allow_pickled)
    print(format_results(results, args.json))
    return 0


# ---- search ----------------------------------------------------------------------------------
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="hyperparameter search: an Optuna space, Ray Tune trials of 5-fold CV, ASHA, MLflow records",
        description="Search training configs: each trial cross-validates one config on the official folds "
        "(all folds at once), ASHA stops bad trials early, MLflow records the search, every trial and "
        "every fold. Every option is saved with the search; --resume NAME continues it.",
    )
    p.add_argument(
        "--space",
        help="named space (seed, default, cpu, augment, regularize: see `esc50 spaces`) "
        "or a Python file path/to/space.py[:function] (default: default)",
    )
    p.add_argument("--trials", help="trials to run (default 20; --smoke: 2)")
    p.add_argument(
        "--epochs", help="epochs per trial, overriding the space's (default: the space's; --smoke: 2)"
    )
    p.add_argument(
        "--folds", help="official folds to cross-validate, e.g. 1,2,3 (default 1,2,3,4,5; --smoke: 1,2)"
    )
    p.add_argument(
        "--cpus-per-fold", help="CPUs of each fold worker, fractional allowed (default 1; --smoke: 0.5)"
    )
    p.add_argument("--gpus-per-fold", help="GPUs of each fold worker, fractional allowed (default 0)")
    p.add_argument(
        "--fold-layout",
        choices=("auto", "workers", "packed"),
        help="a trial's folds as one worker each, or packed into one worker as one batched network "
        "(default auto: packed with GPUs, workers on CPU; see the README)",
    )
    p.add_argument(
        "--shards", help="prepared shards: a path or URI (default: data/shards/<default features>)"
    )
    p.add_argument(
        "--address", help="Ray cluster to connect to: auto or host:port (default: a local Ray on 127.0.0.1)"
    )
    p.add_argument(
        "--storage", help="where Tune keeps results and checkpoints: a path or URI (default ./runs)"
    )
    p.add_argument("--name", help="the search's name (default search-<date>-<time>)")
    p.add_argument("--experiment", help="MLflow experiment (default esc50)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument(
        "--optuna-storage",
        help="Optuna storage URL or SQLite file for the study, `none` for memory "
        "(default: optuna.db beside a SQLite mlflow.db, else in --storage)",
    )
    p.add_argument("--seed", help="seed of the sampler (default 0)")
    p.add_argument("--sampler", help="tpe (default), random or cmaes")
    p.add_argument("--no-asha", dest="asha", action="store_false", default=True, help="no early stopping")
    p.add_argument(
        "--grace-period", help="epochs before ASHA may stop a trial (default: epochs/8, at least 1)"
    )
    p.add_argument("--reduction-factor", help="ASHA keeps 1 in this many trials at each rung (default 3)")
    p.add_argument("--concurrency", help="trials at once (default: as many as the Ray cluster fits)")
    p.add_argument("--max-failures", help="retries of a failed trial from its checkpoint (default 2)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 2 folds, 2 trials, 2 epochs: a check in well under a minute",
    )
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted search NAME (in --storage)")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: go on even though the shards' fingerprint differs from the one the search "
        "started with (other audio or features)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines or summary")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Tune's status table in place of the one-line-per-trial-event progress",
    )
    p.set_defaults(func=_run_search)


def _opt(value: str | None, option: str, kind: type) -> object:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{option} {value!r}: not {'an integer' if kind is int else 'a number'}") from None


def search_options(args: argparse.Namespace):
    """The SearchOptions of `esc50 search` arguments (defaults are filled by SearchOptions.resolve)."""
    from search.options import SearchOptions

    given = {
        "space": args.space,
        "trials": _opt(args.trials, "--trials", int),
        "epochs": _opt(args.epochs, "--epochs", int),
        "folds": args.folds,
        "cpus_per_fold": _opt(args.cpus_per_fold, "--cpus-per-fold", float),
        "gpus_per_fold": _opt(args.gpus_per_fold, "--gpus-per-fold", float),
        "fold_layout": args.fold_layout,
        "shards": args.shards,
        "address": args.address,
        "storage": args.storage,
        "name": args.resume or args.name,
        "experiment": args.experiment,
        "tracking_uri": args.tracking_uri,
        "seed": _opt(args.seed, "--seed", int),
        "sampler": args.sampler,
        "grace_period": _opt(args.grace_period, "--grace-period", int),
        "reduction_factor": _opt(args.reduction_factor, "--reduction-factor", float),
        "concurrency": _opt(args.concurrency, "--concurrency", int),
        "max_failures": _opt(args.max_failures, "--max-failures", int),
        "optuna_storage": args.optuna_storage,
    }
    if args.resume and args.name and args.name != args.resume:
        raise UserError(f"--resume {args.resume} and --name {args.name}: name the search once")
    opts = SearchOptions(**{k: v for k, v in given.items() if v is not None})
    opts.asha = args.asha
    opts.smoke = args.smoke
    if args.quiet and args.verbose:
        raise UserError("-q and -v: choose one")
    opts.verbose = 0 if args.quiet else 2 if args.verbose else 1
    return opts


def _run_search(args: argparse.Namespace) -> int:
    from search.tune import run_search

    if args.force and args.resume is None:
        raise UserError(
            "--force: only with --resume NAME (it lets a resume use shards of another fingerprint)"
        )
    result = run_search(search_options(args), resume=args.resume is not None, force=args.force)
    if result.interrupted:
        return 130
    if result.best_trial_id is None:
        where = result.results_dir
        print(
            f"esc50 search: error: no trial of {result.name} reported a result (see {where})", file=sys.stderr
        )
        return 1
    return 0


# ---- spaces ----------------------------------------------------------------------------------
def _add_spaces(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spaces", help="list the search spaces with their parameters and ranges")
    p.add_argument(
        "spaces",
        nargs="*",
        metavar="SPACE",
        help="named spaces or path/to/file.py[:function] (default: all named)",
    )
    p.set_defaults(func=_run_spaces)


def _run_spaces(args: argparse.Namespace) -> int:
    from spaces import load_space, names

    blocks = []
    for spec in args.spaces or names():
        space = load_space(spec)
        space.validate()
        blocks.append(space.describe().text())
    print("\n\n".join(blocks))
    return 0


# ---- ui --------------------------------------------------------------------------------------
def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the searches' store")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument("--port", type=int, default=5000, help="default %(default)s")
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from search.ui import run_ui

    return run_ui(args.tracking_uri, args.port)


# ---- dashboard -------------------------------------------------------------------------------
def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 over the searches' Optuna studies")
    p.add_argument(
        "--optuna-storage",
        help="Optuna storage URL or SQLite file (default: optuna.db beside the SQLite tracking store, "
        "else in --storage)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI whose optuna.db to show (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    p.add_argument("--storage", help="Tune storage, when the tracking store is not SQLite (default ./runs)")
    p.add_argument("--port", type=int, default=8080, help="default %(default)s")
    p.set_defaults(func=_run_dashboard)


def _run_dashboard(args: argparse.Namespace) -> int:
    from search.ui import run_dashboard

    return run_dashboard(args.optuna_storage, args.tracking_uri, args.storage, args.port)


# ---- main ------------------------------------------------------------------------------------
def _add_main(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "main",
        help="the whole path on embedded defaults: prepare, search, promote (`make run`)",
        description="Prepare the shards (a no-op when up to date), run a search, promote its best trial. "
        "The defaults fit a 2-core CPU in about 15 minutes; raise --trials/--epochs on a GPU machine.",
    )
    p.add_argument(
        "--source", help="ESC-50 copy or archive URL (default: $ESC50_SOURCE, else the official archive)"
    )
    p.add_argument("--space", default="cpu", help="search space (default cpu)")
    p.add_argument("--trials", type=int, help="trials (default 1; --smoke: 2)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space's; --smoke: 2)")
    p.add_argument("--name", help="the search's name (default main-<date>-<time>)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument("--gpus-per-fold", type=float, default=0.0, help="GPUs of each fold worker (default 0)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 2 folds, 2 trials, 2 epochs: the whole path in a minute",
    )
    p.set_defaults(func=_run_main)


def _run_main(args: argparse.Namespace) -> int:
    import time

    from search.options import SearchOptions
    from search.pipeline import run_main

    opts = SearchOptions(
        name=args.name or "main-" + time.strftime("%Y%m%d-%H%M%S"),
        space=args.space,
        # unset under --smoke: the smoke defaults fill them (search/options.py)
        # one trial of the `cpu` recipe is what 15 minutes on 2 cores buy (README, main job)
        trials=args.trials if args.trials is not None or args.smoke else 1,
        epochs=args.epochs,
        tracking_uri=args.tracking_uri,
        gpus_per_fold=args.gpus_per_fold,
        smoke=args.smoke,
    )
    result = run_main(args.source, opts)
    print(result.promoted.summary())
    print(
        f"esc50 main: done in {result.seconds / 60:.1f} min; `esc50 ui` to browse, `esc50 predict FILE` to classify"
    )
    return 0


COMMANDS = [
    _add_prepare,
    _add_search,
    _add_spaces,
    _add_ui,
    _add_dashboard,
    _add_promote,
    _add_predict,
    _add_main,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esc50", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"esc50 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"esc50 {args.command}: interrupted", file=sys.stderr)
        return 130

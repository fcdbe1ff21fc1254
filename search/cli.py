"""`esc50` command line: parses options and calls the module that does the work. No logic here.

Each subcommand has one `_add_<name>` function (its options) and one `_run_<name>` function (the
call into its module); an option several commands take is defined once (`_shared`). Values are
typed as they are parsed. User errors (`UserError`) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from search.errors import UserError

if TYPE_CHECKING:
    from search.options import SearchOptions
    from trainable.model.features import FeatureParams


# ---- typed values and the options several commands share -------------------------------------
def _typed(kind: Callable[[str], Any], option: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, else a UserError naming the option (one line, exit 2)."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UserError(f"{option} {text!r}: not {what}") from None

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off", "") else float(text)


TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
SHARED: dict[str, dict[str, Any]] = {
    "--tracking-uri": {"help": TRACKING_HELP},
    "--storage": {"help": "where Tune keeps results and checkpoints: a path or URI (default ./runs)"},
    "--optuna-storage": {
        "help": "Optuna storage URL or SQLite file for the studies, `none` for memory "
        "(default: optuna.db beside a SQLite tracking store, else in --storage)"
    },
    "--source": {
        "help": "local ESC-50 copy (meta/esc50.csv + audio/), .zip archive or URL "
        "(default: $ESC50_SOURCE, else the official archive)"
    },
    "--space": {
        "help": "named space (seed, default, cpu, augment, regularize: see `esc50 spaces`) "
        "or a Python file path/to/space.py[:function]"
    },
    "--trials": {"type": _typed(int, "--trials"), "help": "trials to run"},
    "--epochs": {"type": _typed(int, "--epochs"), "help": "epochs per trial, overriding the space's"},
    "--name": {"help": "the search's name"},
    "--gpus-per-fold": {
        "type": _typed(float, "--gpus-per-fold"),
        "help": "GPUs of each fold worker, fractional allowed (default 0)",
    },
    "--smoke": {
        "action": "store_true",
        "help": "tiny model, 2 folds, 2 trials, 2 epochs: a check in a minute",
    },
}


def _shared(p: argparse.ArgumentParser, option: str, **changes: Any) -> None:
    """Add the shared `option` to `p`; `changes` adjust its definition (a command's own default)."""
    p.add_argument(option, **{**SHARED[option], **changes})


# ---- prepare ---------------------------------------------------------------------------------
def add_feature_options(p: argparse.ArgumentParser) -> None:
    """Log-mel options (defaults: FeatureParams()); shared by every command that prepares data.
    Each one's dest is its FeatureParams field."""
    from trainable.model.features import STORAGE_DTYPES, FeatureParams

    d = FeatureParams()
    g = p.add_argument_group(
        "features (defaults are the product's; the seed's: --sample-rate 44100 --top-db none)"
    )

    def add(option: str, field: str, kind: Any, help: str, **more: Any) -> None:
        g.add_argument(option, dest=field, type=kind, default=getattr(d, field), help=help, **more)

    add("--sample-rate", "sample_rate", _typed(int, "--sample-rate"), "Hz (default %(default)s)")
    add("--n-fft", "n_fft", _typed(int, "--n-fft"), "default %(default)s")
    add("--hop", "hop_length", _typed(int, "--hop"), "hop length in samples (default %(default)s)")
    add("--n-mels", "n_mels", _typed(int, "--n-mels"), "default %(default)s")
    add("--f-min", "f_min", _typed(float, "--f-min"), "Hz (default %(default)s)")
    add("--f-max", "f_max", _typed(_optional_float, "--f-max"), "Hz, or none for Nyquist (default)")
    add(
        "--log-floor",
        "log_floor",
        _typed(float, "--log-floor"),
        "power floor before dB (default %(default)s)",
    )
    add(
        "--top-db",
        "top_db",
        _typed(_optional_float, "--top-db"),
        "dB range kept per clip, or none (default %(default)s)",
    )
    add("--dtype", "storage_dtype", None, "shard storage (default %(default)s)", choices=STORAGE_DTYPES)


FEATURE_FIELDS = (
    "sample_rate",
    "n_fft",
    "hop_length",
    "n_mels",
    "f_min",
    "f_max",
    "log_floor",
    "top_db",
    "storage_dtype",
)


def feature_params(args: argparse.Namespace) -> FeatureParams:
    """The FeatureParams named by `add_feature_options`; invalid combinations are a UserError."""
    from trainable.model.features import FeatureParams

    try:
        return FeatureParams(**{f: getattr(args, f) for f in FEATURE_FIELDS})
    except ValueError as e:
        raise UserError(str(e)) from None


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn ESC-50 audio into Parquet log-mel shards")
    _shared(p, "--source")
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
    from search.data.prepare import prepare

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
    _shared(p, "--tracking-uri")
    p.add_argument("--name", default="esc50-cnn", help="registered model name (default %(default)s)")
    p.add_argument("--shards", help="shards URI for the out-of-fold report (default: the search's)")
    p.set_defaults(func=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from search.release import champion, promote

    if args.rollback:
        current, previous = champion.rollback(args.tracking_uri, args.name)
        print(f"{args.name}: champion is v{current}, previous is {'v' + previous if previous else 'none'}")
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
    _shared(p, "--tracking-uri")
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
    from search.release.predict import format_results, predict

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
    _shared(p, "--space", help=SHARED["--space"]["help"] + " (default: default)")
    _shared(p, "--trials", help="trials to run (default 20; --smoke: 2)")
    _shared(p, "--epochs", help="epochs per trial, overriding the space's (default: the space's; --smoke: 2)")
    p.add_argument(
        "--folds", help="official folds to cross-validate, e.g. 1,2,3 (default 1,2,3,4,5; --smoke: 1,2)"
    )
    p.add_argument(
        "--cpus-per-fold",
        type=_typed(float, "--cpus-per-fold"),
        help="CPUs of each fold worker, fractional allowed (default 1; --smoke: 0.5)",
    )
    _shared(p, "--gpus-per-fold")
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
    _shared(p, "--storage")
    _shared(p, "--name", help="the search's name (default search-<date>-<time>)")
    p.add_argument("--experiment", help="MLflow experiment (default esc50)")
    _shared(p, "--tracking-uri")
    _shared(p, "--optuna-storage")
    p.add_argument("--seed", type=_typed(int, "--seed"), help="seed of the sampler (default 0)")
    p.add_argument("--sampler", help="tpe (default), random or cmaes")
    p.add_argument("--no-asha", dest="asha", action="store_false", default=True, help="no early stopping")
    p.add_argument(
        "--grace-period",
        type=_typed(int, "--grace-period"),
        help="epochs before ASHA may stop a trial (default: epochs/8, at least 1)",
    )
    p.add_argument(
        "--reduction-factor",
        type=_typed(float, "--reduction-factor"),
        help="ASHA keeps 1 in this many trials at each rung (default 3)",
    )
    p.add_argument(
        "--concurrency",
        type=_typed(int, "--concurrency"),
        help="trials at once (default: as many as the Ray cluster fits)",
    )
    p.add_argument(
        "--max-failures",
        type=_typed(int, "--max-failures"),
        help="retries of a failed trial from its checkpoint (default 2)",
    )
    _shared(p, "--smoke")
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


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The SearchOptions of `esc50 search` arguments (defaults are filled by SearchOptions.resolve)."""
    from search.options import SearchOptions

    if args.resume and args.name and args.name != args.resume:
        raise UserError(f"--resume {args.resume} and --name {args.name}: name the search once")
    if args.quiet and args.verbose:
        raise UserError("-q and -v: choose one")
    given = {
        "space": args.space,
        "trials": args.trials,
        "epochs": args.epochs,
        "folds": args.folds,
        "cpus_per_fold": args.cpus_per_fold,
        "gpus_per_fold": args.gpus_per_fold,
        "fold_layout": args.fold_layout,
        "shards": args.shards,
        "address": args.address,
        "storage": args.storage,
        "name": args.resume or args.name,
        "experiment": args.experiment,
        "tracking_uri": args.tracking_uri,
        "seed": args.seed,
        "sampler": args.sampler,
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor,
        "concurrency": args.concurrency,
        "max_failures": args.max_failures,
        "optuna_storage": args.optuna_storage,
    }
    return SearchOptions(
        **{k: v for k, v in given.items() if v is not None},
        asha=args.asha,
        smoke=args.smoke,
        verbose=0 if args.quiet else 2 if args.verbose else 1,
    )


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
    _shared(p, "--tracking-uri")
    p.add_argument("--port", type=int, default=5000, help="default %(default)s")
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from search.ui import run_ui

    return run_ui(args.tracking_uri, args.port)


# ---- dashboard -------------------------------------------------------------------------------
def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 over the searches' Optuna studies")
    _shared(p, "--optuna-storage")
    _shared(p, "--tracking-uri", help=TRACKING_HELP + "; its optuna.db is shown")
    _shared(p, "--storage", help="Tune storage, when the tracking store is not SQLite (default ./runs)")
    p.add_argument("--port", type=int, default=8080, help="default %(default)s")
    p.set_defaults(func=_run_dashboard)


def _run_dashboard(args: argparse.Namespace) -> int:
    from search.ui import run_dashboard

    return run_dashboard(args.optuna_storage, args.tracking_uri, args.storage, args.port)


# ---- main ------------------------------------------------------------------------------------
def _add_main(sub: argparse._SubParsersAction) -> None:
    from search.pipeline import MAIN_EPOCHS, MAIN_SPACE, MAIN_TRIALS

    p = sub.add_parser(
        "main",
        help="the whole path on embedded defaults: prepare, search, promote (`make run`)",
        description="Prepare the shards (a no-op when up to date), run a search, promote its best trial. "
        "The defaults fit a 2-core CPU in about 15 minutes; raise --trials/--epochs on a GPU machine.",
    )
    _shared(p, "--source")
    _shared(p, "--space", default=MAIN_SPACE, help=f"search space (default {MAIN_SPACE})")
    _shared(p, "--trials", help=f"trials (default {MAIN_TRIALS}; --smoke: 2)")
    _shared(p, "--epochs", help=f"epochs per trial (default {MAIN_EPOCHS or 'the space’s own'}; --smoke: 2)")
    _shared(p, "--name", help="the search's name (default main-<date>-<time>)")
    _shared(p, "--tracking-uri")
    _shared(p, "--gpus-per-fold", default=0.0)
    _shared(p, "--smoke", help="tiny model, 2 folds, 2 trials, 2 epochs: the whole path in a minute")
    p.set_defaults(func=_run_main)


def _run_main(args: argparse.Namespace) -> int:
    from search.pipeline import main_options, run_main

    opts = main_options(
        args.name, args.space, args.trials, args.epochs, args.tracking_uri, args.gpus_per_fold, args.smoke
    )
    result = run_main(args.source, opts)
    if result.promoted is None:  # Ctrl-C in the search (resumable) or the promotion: nothing promoted
        stage = "search" if result.search.interrupted else "promotion, after the search finished"
        print(
            f"esc50 main: interrupted in the {stage}; nothing promoted; go on with: {result.next_commands()}",
            file=sys.stderr,
        )
        return 130
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
    # No usage statistics or telemetry from the libraries a command starts (set here, not at import).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser().parse_args(argv)  # a typed value that does not convert: UserError
        command = args.command
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"esc50 {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"esc50 {command}: interrupted", file=sys.stderr)
        return 130

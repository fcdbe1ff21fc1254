"""What a search shows and leaves behind: the progress table, the ranked summary, the results CSV and
the Optuna plots of the parent run.

    rows = collect(result_grid, run_ids)           # one TrialRow per Tune trial
    print(summary_table(rows, sampled_names))      # ranked by cv_acc_mean
    write_csv(rows, "results.csv")
    study = optuna_study(space, rows)              # a study rebuilt from Tune's results
    files = write_plots(study, folder)             # HTML (plotly) or PNG (matplotlib)
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from search.store import COMPLETED, FAILED, PRUNED, planned_epochs, trial_status
from trainable.errors import error_line
from trainable.protocol import METRIC, best_first
from trainable.storage import uri_of

PENDING = "pending"

METRIC_COLUMNS = {METRIC: "acc", "cv_acc_std": "acc_std", "epoch": "epoch"}
_TRIAL_DIR = re.compile(r"trial_([0-9a-f]{5,}(?:_\d+)?)")


@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | pruned | failed
    epochs_done: int
    epochs_planned: int
    cv_acc_mean: float | None
    cv_acc_std: float | None
    metrics: dict[str, float]  # the last reported metrics (per-fold accuracy and loss...)
    config: dict[str, Any]
    checkpoint: str | None
    run_id: str | None = None
    error: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, cv_acc_mean)
    index: int = 0  # the order Tune made the trials in

    @property
    def value(self) -> float:
        return self.cv_acc_mean if self.cv_acc_mean is not None else -math.inf


def trial_dirname(trial: Any) -> str:
    """Tune trial directory names: short and stable (module-level: Tune pickles it)."""
    return f"trial_{trial.trial_id}"


def collect(
    results: Any, run_ids: Mapping[str, str] | None = None, statuses: Mapping[str, str | None] | None = None
) -> list[TrialRow]:
    """One row per trial of a Tune ResultGrid (every trial, also failed ones).

    `statuses`: the status the MLflow callback recorded per trial id (completed, pruned, failed,
    interrupted); a trial without one is judged from its results (never started: pending)."""
    rows = []
    for index, r in enumerate(results):
        metrics = dict(r.metrics or {})
        tid = str(metrics.get("trial_id") or _trial_id_from_path(r.path))
        config = dict(r.config or {})
        errored = r.error is not None
        reported = metrics.get("epoch") is not None
        status = (statuses or {}).get(tid) or (
            trial_status(config, metrics, errored) if reported else PENDING
        )
        if errored:
            status = FAILED
        epochs = planned_epochs(config)
        history: list[tuple[int, float]] = []
        df = r.metrics_dataframe
        if df is not None and METRIC in getattr(df, "columns", ()):
            seen = {}
            for _, row in df.iterrows():
                ep = int(row.get("epoch", row.get("training_iteration", 0)) or 0)
                if _num(row.get(METRIC)) is not None:
                    seen[ep] = float(row[METRIC])
            history = sorted(seen.items())
        keep = {k: float(v) for k, v in metrics.items() if _is_metric(k) and _num(v) is not None}
        rows.append(
            TrialRow(
                trial_id=tid,
                status=status,
                epochs_done=int(metrics.get("epoch") or 0),
                epochs_planned=epochs,
                cv_acc_mean=_num(metrics.get(METRIC)),
                cv_acc_std=_num(metrics.get("cv_acc_std")),
                metrics=keep,
                config=config,
                checkpoint=uri_of(getattr(r.checkpoint, "filesystem", None), r.checkpoint.path)
                if r.checkpoint is not None
                else None,
                run_id=(run_ids or {}).get(tid),
                error=error_line(r.error, last=True) if errored else None,
                history=history,
                index=index,
            )
        )
    return ranked(rows)


def _trial_id_from_path(path: str | None) -> str:
    m = _TRIAL_DIR.search(os.path.basename(str(path or "")))
    return m.group(1) if m else os.path.basename(str(path or "?"))


def _is_metric(k: str) -> bool:
    return k.startswith(("cv_", "fold")) or k in ("epoch", "epoch_seconds")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ranked(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Completed trials by cv_acc_mean first, then pruned ones, then failed ones."""
    order = {COMPLETED: 0, PRUNED: 1, FAILED: 2}  # then interrupted / pending
    return sorted(rows, key=lambda r: (order.get(r.status, 3), *best_first(r.cv_acc_mean, r.index)))


def best(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The best completed trial (all epochs trained); else the best trial that reported at all.
    Ties: trainable/protocol.py best_first (`esc50 promote` picks by the same rule)."""
    done = [r for r in rows if r.status == COMPLETED and r.cv_acc_mean is not None]
    pool = done or [r for r in rows if r.cv_acc_mean is not None]
    return min(pool, key=lambda r: best_first(r.cv_acc_mean, r.index)) if pool else None


def counts(rows: Sequence[TrialRow]) -> dict[str, int]:
    out = {COMPLETED: 0, PRUNED: 0, FAILED: 0}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out


# ---- terminal ---------------------------------------------------------------------------------


def progress_reporter(sampled: Sequence[str], max_rows: int = 20):
    """Tune's CLI table with the search metric, its spread and the epoch, and the sampled params."""
    from ray.tune import CLIReporter

    return CLIReporter(
        metric_columns=dict(METRIC_COLUMNS),
        parameter_columns=list(sampled)[:6] or None,
        max_progress_rows=max_rows,
        max_report_frequency=15,
        sort_by_metric=True,
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def summary_table(rows: Sequence[TrialRow], sampled: Sequence[str] = (), limit: int = 25) -> str:
    """The ranked summary printed when a search ends."""
    params = [p for p in sampled if any(p in r.config for r in rows)][:6]
    head = ["rank", "trial", "status", "epochs", METRIC, "std", *params]
    body = []
    for i, r in enumerate(rows[:limit], 1):
        body.append(
            [
                str(i),
                r.trial_id,
                r.status,
                f"{r.epochs_done}/{r.epochs_planned}",
                "-" if r.cv_acc_mean is None else f"{r.cv_acc_mean:.4f}",
                "-" if r.cv_acc_std is None else f"{r.cv_acc_std:.4f}",
                *[_fmt(r.config.get(p)) for p in params],
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in results.csv")
    return "\n".join(lines)


# ---- files ------------------------------------------------------------------------------------


def write_csv(rows: Sequence[TrialRow], path: str) -> str:
    """results.csv: one row per trial, ranked; metrics and the full config as columns."""
    metric_keys = sorted({k for r in rows for k in r.metrics})
    config_keys = sorted({k for r in rows for k in r.config})
    fields = [
        "rank",
        "trial_id",
        "status",
        "epochs_done",
        "epochs_planned",
        "mlflow_run_id",
        "checkpoint",
        "error",
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + metric_keys + [f"config.{k}" for k in config_keys])
        for i, r in enumerate(rows, 1):
            w.writerow(
                [
                    i,
                    r.trial_id,
                    r.status,
                    r.epochs_done,
                    r.epochs_planned,
                    r.run_id or "",
                    r.checkpoint or "",
                    r.error or "",
                ]
                + [r.metrics.get(k, "") for k in metric_keys]
                + [r.config.get(k, "") for k in config_keys]
            )
    return path


def optuna_study(space: Any, rows: Sequence[TrialRow], direction: str = "maximize"):
    """An Optuna study of the trials, for Optuna's plots.

    Each trial's sampled parameters and their distributions are found by running the space once
    more with the trial's config enqueued (a conditional space takes the same branch), so the
    study does not depend on the searcher's private state. Completed trials are COMPLETE, pruned
    ones PRUNED (with their per-epoch values), failed ones FAIL.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction=direction)
    study = optuna.create_study(direction=direction, study_name="search")
    states = {COMPLETED: TrialState.COMPLETE, PRUNED: TrialState.PRUNED, FAILED: TrialState.FAIL}
    # Keys the search fixed over the space were not chosen by the sampler: leave them out.
    fixed = set(getattr(space, "overrides", {}) or {})
    if "epochs" in fixed:
        fixed.add("warmup_epochs")  # rescaled with the epochs
    for r in sorted(rows, key=lambda r: r.index):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.enqueue_trial({k: v for k, v in r.config.items() if k not in fixed}, skip_if_exists=False)
            t = probe.ask()
            try:
                space.fn()(t)
            except Exception:
                probe.tell(t, state=TrialState.FAIL)
                continue
            params, dists = {}, {}
            for k, d in t.distributions.items():
                v = t.params[k]
                if k in fixed:
                    continue
                try:
                    ok = d._contains(d.to_internal_repr(v))
                except Exception:
                    ok = False
                if ok:
                    params[k], dists[k] = v, d
            probe.tell(t, state=TrialState.FAIL)
            state = states.get(r.status, TrialState.FAIL)
            value = r.cv_acc_mean if state == TrialState.COMPLETE else None
            if state == TrialState.COMPLETE and value is None:
                state = TrialState.FAIL
            study.add_trial(
                optuna.trial.create_trial(
                    state=state,
                    value=value,
                    params=params,
                    distributions=dists,
                    intermediate_values={int(e): float(v) for e, v in r.history},
                    user_attrs={"trial_id": r.trial_id, "epochs": r.epochs_done},
                )
            )
    return study


PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def write_plots(study: Any, folder: str) -> tuple[list[str], dict[str, str]]:
    """Optuna's plots: PNG (matplotlib, always) and interactive HTML (plotly, when installed).

    Returns (files written, {plot: why it was skipped})."""
    os.makedirs(folder, exist_ok=True)
    try:
        import plotly  # noqa: F401

        backends = ["matplotlib", "plotly"]
    except ImportError:
        backends = ["matplotlib"]
    files, skipped = [], {}
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for name, fn_name in PLOTS.items():
        if name == "param_importances" and (len(complete) < 2 or not any(t.params for t in complete)):
            skipped[name] = "needs 2 completed trials with sampled parameters"
            continue
        if name == "parallel_coordinate" and not any(t.params for t in complete):
            skipped[name] = "no sampled parameters"
            continue
        for backend in backends:
            try:
                files.append(_plot(study, name, fn_name, folder, backend))
            except Exception as e:  # a plot Optuna cannot draw for this study (too few trials...)
                skipped[f"{name} ({backend})"] = f"{type(e).__name__}: {error_line(e, last=True)}"
    return files, skipped


def _plot(study: Any, name: str, fn_name: str, folder: str, backend: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "plotly":
            import optuna.visualization as vis

            fig = getattr(vis, fn_name)(study)
            path = os.path.join(folder, f"{name}.html")
            fig.write_html(path, include_plotlyjs="cdn")
            return path
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as vis

        ax = getattr(vis, fn_name)(study)
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        path = os.path.join(folder, f"{name}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

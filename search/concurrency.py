"""How many trials run at once, and what one trial takes from the cluster.

`default_concurrency(opts)`: `--concurrency` if given, else as many trials as the cluster fits at
once, at most `--trials`. On an autoscaling cluster (a head with no room for a fold, workers added
on demand) the cluster's size now says little, so the bound is what its autoscaler config lets it
grow to; the trials beyond what fits now wait for the nodes the autoscaler adds for them.
`plan_concurrency` is the decision itself, pure, so it can be tested without a cluster.
"""

from __future__ import annotations

import math
import os
import sys

from search.errors import UserError
from search.options import SearchOptions


def trial_resources(opts: SearchOptions) -> tuple[float, float]:
    """(CPUs, GPUs) one trial takes: its coordinating function plus its fold bundles (one per fold,
    or one for all folds when packed: trainable/layout.py; a packed trial takes at most one GPU)."""
    from trainable.cv import TRIAL_CPUS
    from trainable.layout import resolve_layout, trial_bundles

    n = len(opts.folds or ())
    layout = resolve_layout(opts.fold_layout, float(opts.gpus_per_fold))
    bundles = trial_bundles(n, float(opts.cpus_per_fold), float(opts.gpus_per_fold), layout)
    return TRIAL_CPUS + sum(b["CPU"] for b in bundles), sum(b.get("GPU", 0.0) for b in bundles)


# Where `ray up` leaves the cluster config on the head node, where `ray job submit` and `ray exec`
# run the driver (Tune looks for the same file to tell an autoscaling cluster).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_config_max_resources(path: str = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """The most of each resource an autoscaler config lets the cluster grow to: the head plus the
    largest worker nodes each type's and the global `max_workers` allow. None without such a file."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return None
    try:
        # Ray's own reader fills the defaults `ray up` would (e.g. a type's max_workers). It is Ray's
        # internal API: should it move, or the file not be an autoscaler config, no bound is known.
        from ray.autoscaler.v2.instance_manager.config import FileConfigReader

        config = FileConfigReader(path).get_cached_autoscaling_config()
        types, head = config.get_node_type_configs() or {}, config.get_head_node_type()
    except Exception:
        return None
    cap = config.get_max_num_worker_nodes()
    most: dict[str, float] = {}
    for key in {k for t in types.values() for k in t.resources}:
        most[key] = types[head].resources.get(key, 0) if head in types else 0
        left = math.inf if cap is None else cap
        # max_worker_nodes counts the head once for its own type.
        workers = [(t.resources.get(key, 0), t.max_worker_nodes - (n == head)) for n, t in types.items()]
        for per_node, count in sorted(workers, reverse=True):
            take = min(count, left)
            most[key] += per_node * take
            left -= take
    return most or None


def cluster_max_resources(config_path: str = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """The most of each resource the connected cluster's autoscaler may grow it to; None if unknown."""
    try:
        # What Ray Train and Data consult. The GCS has it only where an autoscaler reports its config
        # there; the one `ray up` starts (cluster.yaml) does not, hence the file on the head.
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:
        most = None
    return most or autoscaler_config_max_resources(config_path)


def _fits(resources: dict[str, float], per_trial: tuple[float, float]) -> int:
    cpus, gpus = per_trial
    n = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
    return min(n, math.floor(resources.get("GPU", 0) / gpus + 1e-9)) if gpus > 0 else n


def plan_concurrency(
    now: dict[str, float],
    most: dict[str, float] | None,
    per_trial: tuple[float, float],
    trials: int,
    explicit: int | None,
    connected: bool,
) -> tuple[int, str | None]:
    """(trials at once, a line for the user or None) from the cluster's resources `now`, the most its
    autoscaler can grow to (None: not autoscaling), one trial's (CPUs, GPUs), the number of trials,
    --concurrency and whether Ray is a cluster we connected to. Raises UserError if a trial never fits."""
    cpus, gpus = per_trial
    room = max(_fits(now, per_trial), _fits(most or {}, per_trial))
    have = f"{now.get('CPU', 0):g} CPUs, {now.get('GPU', 0):g} GPUs"
    if room < 1 and connected and most is None:
        # A cluster with no room yet whose autoscaler config we cannot read (e.g. `ray start` nodes
        # still to join): run --concurrency trials (default 1) and let them wait.
        return explicit or 1, (
            f"esc50 search: the cluster has no room for a trial yet ({have}); trials wait for the autoscaler"
        )
    if room < 1:
        if most is not None:
            have = f"{most.get('CPU', 0):g} CPUs, {most.get('GPU', 0):g} GPUs even at its largest"
        raise UserError(
            f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs (folds x --cpus-per-fold/--gpus-per-fold, "
            f"plus the trial's own) but the Ray cluster has {have}"
        )
    n = explicit or min(room, trials)
    if most is None:
        return n, None
    why = "--concurrency" if explicit else f"--trials {trials}" if n < room else ""
    return n, (
        f"esc50 search: the autoscaler can grow to {most.get('CPU', 0):g} CPUs / {most.get('GPU', 0):g} GPUs: "
        f"{n} trials at once{f' (room for {room}; {why})' if why else ''}; trials wait while it adds nodes"
    )


def default_concurrency(opts: SearchOptions) -> int:
    """--concurrency, else as many trials as the cluster fits at once (an autoscaling one: at its
    largest), at most `trials`; says on stderr what it chose on a cluster that must grow first."""
    import ray

    n, message = plan_concurrency(
        now=ray.cluster_resources(),
        most=cluster_max_resources() if opts.address else None,  # a local Ray has no autoscaler
        per_trial=trial_resources(opts),
        trials=int(opts.trials or 1),
        explicit=opts.concurrency,
        connected=bool(opts.address),
    )
    if message:
        print(message, file=sys.stderr)
    return n

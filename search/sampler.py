"""The Optuna sampler of a search, built from its options (no Ray here: the benchmarks use it too)."""

from __future__ import annotations

import warnings
from typing import Any

from search.options import SearchOptions


def make_sampler(opts: SearchOptions) -> Any:
    """tpe (multivariate, grouped, constant liar), random or cmaes, seeded with `opts.seed`."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=opts.seed)
    if opts.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=opts.seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(
        seed=opts.seed,
        n_startup_trials=opts.n_startup_trials(),
        multivariate=True,
        group=True,  # conditional spaces: model each branch's parameters together
        constant_liar=True,  # concurrent trials: do not all suggest the same point
    )

"""search/sampler.py: each --sampler name gives its Optuna sampler, seeded, with the product's TPE settings."""

from __future__ import annotations

import optuna
import pytest

from search.options import SearchOptions
from search.sampler import make_sampler


@pytest.mark.parametrize(
    "name, kind",
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
    ],
)
def test_each_sampler_name_gives_its_sampler(name: str, kind: type) -> None:
    assert isinstance(make_sampler(SearchOptions(sampler=name, seed=3, trials=20)), kind)


def _draws(opts: SearchOptions, n: int = 12) -> list[float]:
    study = optuna.create_study(sampler=make_sampler(opts), direction="maximize")
    out = []
    for _ in range(n):
        trial = study.ask()
        x = trial.suggest_float("x", -1.0, 1.0)
        study.tell(trial, -((x - 0.3) ** 2))
        out.append(x)
    return out


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    a = _draws(SearchOptions(sampler="tpe", seed=1, trials=8))
    assert a == _draws(SearchOptions(sampler="tpe", seed=1, trials=8))
    assert a != _draws(SearchOptions(sampler="tpe", seed=2, trials=8))


def test_tpe_starts_with_the_startup_trials_of_the_options() -> None:
    # trials=8 -> 3 random startup trials (trials // 4, at least 3); TPE models the rest
    sampler = make_sampler(SearchOptions(sampler="tpe", seed=0, trials=8))
    assert sampler._n_startup_trials == SearchOptions(trials=8).n_startup_trials() == 3

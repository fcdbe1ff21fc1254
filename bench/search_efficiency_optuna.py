"""The Ray-free engine of bench/search_efficiency_bench.py (`--engine optuna`), for machines without
Ray, such as a lent GPU box: the same space, sampler and fold training, without Tune or MLflow.

`--workers` processes share one Optuna study through a journal file (Optuna's multi-process
storage). Each asks a trial, trains its validation folds in lock-step with `FoldTrainer`, reports
the mean validation accuracy per epoch (`trial.report`) and, with ASHA on, asks Optuna's
`SuccessiveHalvingPruner` (asynchronous successive halving, the algorithm behind Ray's
ASHAScheduler; at rungs grace x eta^k both keep about the top 1/eta, Ray by a percentile of the
rung, Optuna by rank) whether to stop. Trials stopped early are told PRUNED, as
the product's searcher tells them. The sampler is the product's (`search/sampler.py`).

Every reported epoch goes to a per-worker JSON-lines file as (time, trial, epoch, value); the
driver merges them in time order, which is what `delivered` counts. Each trial's sampled values and
the config it trained go to `<name>.<worker>.configs.jsonl` (`configs`), so the benchmark can check
that every trial trained what its sampler drew (an earlier version read `trial.params` before the
space had sampled anything, and every trial trained the defaults).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    """One search of the benchmark, as each worker process gets it."""

    name: str
    sampler: str  # tpe | random
    asha: bool
    seed: int
    trials: int  # at most this many trials
    epoch_budget: int  # no new trial once this many trial-epochs were spent
    target: float | None  # stop the search once a trial COMPLETES with a final score >= target
    epochs: int
    grace: int
    reduction_factor: int
    space: str  # a space spec for spaces.load_space (a file:function)
    shards: str
    folds: tuple[int, ...]  # the folds in play
    val_folds: tuple[int, ...]  # each trained on the other folds in play
    device: str
    workdir: str


def _storage(job: Job) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(job.workdir) / f"{job.name}.journal")))


def _spent(study: Any) -> int:
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))


def _worker(job: Job, worker: int) -> None:
    import optuna
    import torch

    from search.options import SearchOptions
    from search.sampler import make_sampler
    from spaces import load_space
    from trainable.config import TrainConfig
    from trainable.fold import FoldTrainer
    from trainable.shards import load_shards

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # many workers share the machine's cores
    opts = SearchOptions(sampler=job.sampler, seed=job.seed + 1000 * worker, trials=job.trials)
    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=job.grace, reduction_factor=job.reduction_factor)
        if job.asha
        else optuna.pruners.NopPruner()
    )
    study = optuna.load_study(
        study_name=job.name, storage=_storage(job), sampler=make_sampler(opts), pruner=pruner
    )
    space = load_space(job.space, {"epochs": job.epochs, "device": job.device})
    data = load_shards(job.shards, folds=list(job.folds))
    stop_file = Path(job.workdir) / f"{job.name}.stop"
    log = open(Path(job.workdir) / f"{job.name}.{worker}.jsonl", "a")  # noqa: SIM115
    trained = open(Path(job.workdir) / f"{job.name}.{worker}.configs.jsonl", "a")  # noqa: SIM115

    while not stop_file.exists() and _spent(study) < job.epoch_budget:
        trial = study.ask()
        if trial.number >= job.trials:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # over the limit: ignored by samplers
            break
        # The space samples first (define-by-run: trial.params is empty until it has run).
        fixed = space(trial)
        config = TrainConfig.from_dict({**trial.params, **fixed})
        record = {"trial": trial.number, "sampled": dict(trial.params), "trained": config.to_dict()}
        trained.write(json.dumps(record) + "\n")
        trained.flush()
        trainers = []
        for v in job.val_folds:
            val = data.fold == v
            trainers.append(FoldTrainer(config, data.x[~val], data.y[~val], data.x[val], data.y[val], fold=v))
        state, value = optuna.trial.TrialState.COMPLETE, None
        for epoch in range(1, job.epochs + 1):
            value = sum(t.train_epoch()["val_acc"] for t in trainers) / len(trainers)
            trial.report(value, epoch)
            log.write(json.dumps([time.time(), trial.number, epoch, value]) + "\n")
            log.flush()
            if job.target is not None and epoch == job.epochs and value >= job.target - 1e-12:
                stop_file.touch()
            if stop_file.exists() or (epoch < job.epochs and trial.should_prune()):
                state = optuna.trial.TrialState.PRUNED if epoch < job.epochs else state
                break
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    log.close()
    trained.close()


def configs(job: Job) -> dict[str, dict]:
    """trial -> {"sampled": the values its sampler drew, "trained": the TrainConfig it trained}."""
    out = {}
    for f in Path(job.workdir).glob(f"{job.name}.*.configs.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[str(r["trial"])] = {"sampled": r["sampled"], "trained": r["trained"]}
    return out


def run(job: Job, workers: int) -> list[tuple[float, int, int, float]]:
    """Run one search over `workers` processes; every reported epoch, in time order."""
    import optuna

    Path(job.workdir).mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name=job.name, storage=_storage(job), direction="maximize")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(job, w)) for w in range(workers)]
    for p in procs:
        p.start()
        time.sleep(0.5)  # staggered: the first asks do not race for the same trial numbers
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"{job.name}: {len(failed)} worker(s) failed (exit codes {failed})")
    events = []
    for f in Path(job.workdir).glob(f"{job.name}.*.jsonl"):
        if f.name.endswith(".configs.jsonl"):
            continue
        events += [tuple(json.loads(line)) for line in f.read_text().splitlines()]
    return sorted(events)


def counts(job: Job) -> dict[str, int]:
    import optuna

    trials = optuna.load_study(study_name=job.name, storage=_storage(job)).get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials if t.number < job.trials]
    return {s: states.count(s) for s in ("complete", "pruned", "running") if states.count(s)}

"""How a trial's folds are laid out on the cluster: one worker per fold, or all folds packed in one.

    workers  one FoldWorker actor per fold (trainable/fold_worker.py), each in its own bundle of
             the trial's placement group: bundle 0 = the trial function, bundle i = fold i's
             {CPU: cpus_per_fold, GPU: gpus_per_fold}. Folds may spread over nodes.
    packed   one PackedFoldWorker (trainable/packed_worker.py) training every fold as one batched
             network (trainable/packed.py), in one bundle holding the whole trial's share:
             {CPU: folds x cpus_per_fold, GPU: min(1, folds x gpus_per_fold)}. A packed trial
             runs on one device, so its GPU share is capped at one GPU; below one, several packed
             trials share a GPU (e.g. 5 folds x --gpus-per-fold 0.1 = 0.5 GPU: two trials per GPU).
    auto     (the default) `GPU_AUTO` (packed) when the folds get GPUs; on CPU, `CPU_AUTO`
             (workers: measured faster on the 2-core CPU this project is developed on, README,
             Benchmarks; oneDNN's grouped convolutions are slower than the separate ones there).

Both layouts reserve the same CPUs, and the same GPUs up to that cap, so a cluster fits the same
number of trials either way (search/concurrency.py), and checkpoints are the same files.
Imports nothing heavy: the CLI and the trial process use it.
"""

from __future__ import annotations

LAYOUTS = ("auto", "workers", "packed")
# What `auto` picks without GPUs; see the module docstring and the README's Benchmarks.
CPU_AUTO = "workers"
# With GPUs: packed, by design (5 fold processes sharing an H100 moved no more work per second than
# one fold alone). Not yet measured on a GPU: bench/gpu_run.sh measures both; flip it if packed loses.
GPU_AUTO = "packed"


def resolve_layout(layout: str, gpus_per_fold: float) -> str:
    """'auto' | 'workers' | 'packed' -> the layout a trial uses ('workers' or 'packed')."""
    layout = str(layout).lower()
    if layout not in LAYOUTS:
        raise ValueError(f"fold layout {layout!r} is not one of {LAYOUTS}")
    if layout != "auto":
        return layout
    return GPU_AUTO if gpus_per_fold > 0 else CPU_AUTO


def trial_bundles(
    n_folds: int, cpus_per_fold: float, gpus_per_fold: float, layout: str
) -> list[dict[str, float]]:
    """The bundles after bundle 0 (the trial function) of a trial's placement group, for a resolved layout."""
    if layout == "packed":
        bundle = {"CPU": n_folds * float(cpus_per_fold)}
        if gpus_per_fold > 0:
            bundle["GPU"] = min(1.0, n_folds * float(gpus_per_fold))
        return [bundle]
    bundle = {"CPU": float(cpus_per_fold)}
    if gpus_per_fold > 0:
        bundle["GPU"] = float(gpus_per_fold)
    return [dict(bundle) for _ in range(n_folds)]


def worker_threads(cpus: float) -> int:
    """torch threads of a worker holding `cpus` CPUs (fractional: at least one)."""
    return max(1, int(cpus))

"""bf16 autocast on the CPU: a fold's training epoch with `bf16` on against off, same run.

`TrainConfig.bf16` turns on bf16 autocast where `bf16_is_fast` says it pays (CUDA, or a CPU with
AMX bf16 tiles). This times what the product does with it: `FoldTrainer.train_epoch` (augmented
batches, forward, backward, AdamW, evaluation) of one fold, single-threaded as a fold worker on a
2-core box is, for each recipe, with bf16 off and on, interleaved (the order alternates every
repeat). It reports each arm's median epoch seconds and the off/on ratio, and whether autocast was
really on in the bf16 arm (on a CPU without AMX it is not, and the ratio is ~1 by construction).

    python bench/cpu_bf16_bench.py [--recipes compact,cpu] [--clips 400] [--repeats 5] [--threads 1]
        [--smoke] [--out FILE]

Data are synthetic (random dB values of the product's feature shape; timing does not depend on the
values). Writes bench/results/cpu_bf16_<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"

SMOKE = {"arch": "cnn", "width": 4, "depth": 2, "batch_size": 16, "epochs": 50, "device": "cpu"}


def recipe(name: str) -> dict[str, Any]:
    """A preset by name, or `cpu`: the `cpu` space's recipe (spaces/builtin.py) at its centre."""
    from spaces.builtin import CPU_RECIPE
    from trainable.config import PRESETS

    base = CPU_RECIPE if name == "cpu" else PRESETS[name]
    return {**base, "epochs": 50, "device": "cpu"}  # many epochs: the schedule stays mid-range


def time_epochs(config: dict[str, Any], clips: int, repeats: int) -> dict[str, Any]:
    """Interleaved epochs of two trainers that differ only in `bf16`; raw seconds of each."""
    import torch

    from trainable.fold import FoldTrainer

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(clips, 64, 216, generator=g) * -80).half()
    y = torch.arange(clips) % 50
    n_val = max(1, clips // 5)
    arms = {
        bf16: FoldTrainer({**config, "bf16": bf16}, x[n_val:], y[n_val:], x[:n_val], y[:n_val])
        for bf16 in (False, True)
    }
    for trainer in arms.values():  # warm-up: oneDNN picks and caches its kernels on first use
        trainer.train_epoch()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for bf16 in (False, True) if r % 2 == 0 else (True, False):
            seconds[bf16].append(arms[bf16].train_epoch()["epoch_seconds"])
    fp32, bf16 = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {
        "autocast": {"fp32_arm": arms[False].autocast, "bf16_arm": arms[True].autocast},
        "epoch_seconds": {"fp32": seconds[False], "bf16": seconds[True]},
        "median_epoch_seconds": {"fp32": fp32, "bf16": bf16},
        "fp32_over_bf16": fp32 / bf16,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="compact,cpu", help="presets or `cpu`, comma-separated")
    p.add_argument("--clips", type=int, default=400, help="clips of the fold (a fifth for validation)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a fold worker's)")
    p.add_argument("--smoke", action="store_true", help="a tiny network and few clips: seconds")
    p.add_argument("--out", help="result JSON (default bench/results/cpu_bf16_<time>.json)")
    args = p.parse_args(argv)

    import torch
    from machine import machine

    from trainable.fold import bf16_is_fast

    torch.set_num_threads(args.threads)
    if args.smoke:
        configs = {"smoke": SMOKE}
        args.clips, args.repeats = 40, 2
    else:
        configs = {name: recipe(name) for name in args.recipes.split(",")}
    result: dict[str, Any] = {
        "what": "FoldTrainer.train_epoch seconds, bf16 autocast off vs on, interleaved",
        "command": ["python", "bench/cpu_bf16_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "machine": machine(),
        "bf16_is_fast_on_this_cpu": bf16_is_fast(torch.device("cpu")),
        "clips": args.clips,
        "repeats": args.repeats,
        "recipes": {},
    }
    for name, config in configs.items():
        t0 = time.perf_counter()
        r = time_epochs(config, args.clips, args.repeats)
        result["recipes"][name] = {"config": config, **r, "wall_s": time.perf_counter() - t0}
        med = r["median_epoch_seconds"]
        print(
            f"{name}: fp32 {med['fp32']:.2f} s/epoch, bf16 {med['bf16']:.2f} s/epoch, "
            f"ratio {r['fp32_over_bf16']:.2f} (autocast in the bf16 arm: {r['autocast']['bf16_arm']})",
            flush=True,
        )
    out = Path(args.out) if args.out else RESULTS / f"cpu_bf16_{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

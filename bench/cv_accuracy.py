"""5-fold cross-validation accuracy of a named preset (or a JSON config) on the real ESC-50 shards.

Runs the official folds one after another with `FoldTrainer` directly (no Ray), prints per-epoch
and per-fold results, and writes bench/results/cv_<name>_<time>.json, rewritten after every fold
so that partial results survive an interrupted run.

    python bench/cv_accuracy.py --shards data/shards/<id> --preset compact
    python bench/cv_accuracy.py --shards data/shards/<id> --config my.json --folds 5 --set epochs=10
    python bench/cv_accuracy.py --merge bench/results/cv_a.json bench/results/cv_b.json  # disjoint folds
    python bench/cv_accuracy.py --shards <tiny shards> --preset smoke --folds 1,2 --out x.json  # smoke
    nohup python bench/cv_accuracy.py --shards ... --preset compact > bench/results/cv.log 2>&1 &

`--shards` defaults to the path in .team/REAL_SHARDS.txt when that file exists.
"""

from __future__ import annotations

import os

# Under CPU contention (other processes on a small box) OpenMP's spin-waiting threads slow a
# step 3x; passive waiting keeps the slowdown proportional to the CPU share we actually get.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from machine import machine  # bench/machine.py: scripts run as `python bench/<name>.py`

from trainable.config import TrainConfig  # noqa: E402
from trainable.fold import FoldTrainer  # noqa: E402
from trainable.model.networks import build_model, count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def default_shards() -> str | None:
    f = ROOT / ".team" / "REAL_SHARDS.txt"
    return f.read_text().strip() if f.exists() else None


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def merge(paths: list[str], name: str | None, out: str | None = None) -> Path:
    """One result from runs of the same config over disjoint folds (e.g. two processes)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    config = runs[0]["config"]
    if any(r["config"] != config for r in runs):
        raise SystemExit("cannot merge: the runs used different configs")
    folds: dict[str, dict] = {}
    for r in runs:
        overlap = set(folds) & set(r["folds"])
        if overlap:
            raise SystemExit(f"cannot merge: fold(s) {sorted(overlap)} in more than one run")
        folds.update(r["folds"])
    accs = [f["val_acc"] for f in folds.values()]
    name = name or f"{runs[0]['name']}_merged"
    result = {
        **{k: runs[0][k] for k in ("config", "shards", "feature_params", "machine")},
        "name": name,
        "merged_from": [str(p) for p in paths],
        "folds": dict(sorted(folds.items())),
        "mean_acc": statistics.mean(accs),
        "std_acc": statistics.pstdev(accs),
        # every fold trained all its epochs (a run stopped after its last wanted fold still counts)
        "complete": all(len(f["history"]) == config["epochs"] for f in folds.values()),
        "compute_seconds": sum(f["seconds"] for f in folds.values()),
    }
    out = Path(out) if out else RESULTS / f"cv_{name}.json"
    out.write_text(json.dumps(result, indent=1))
    print("per-fold accuracy: " + "  ".join(f"{k}: {v['val_acc']:.4f}" for k, v in result["folds"].items()))
    print(
        f"mean accuracy over {len(accs)} folds: {result['mean_acc']:.4f} (std {result['std_acc']:.4f}); result: {out}"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON", help="combine results of disjoint folds")
    ap.add_argument("--shards", default=default_shards(), help="prepared dataset (data/shards/<id>)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="compact")
    src.add_argument("--config", help="JSON file with a training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--folds", default="1,2,3,4,5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="override the config's device")
    ap.add_argument("--name", default=None, help="result file name stem (default: the preset/config name)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/cv_<name>_<time>.json)")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.name, args.out)
        return
    if not args.shards:
        ap.error("--shards is required (no .team/REAL_SHARDS.txt)")

    torch.set_num_threads(args.threads)
    if args.config:
        base = json.loads(Path(args.config).read_text())
        name = args.name or Path(args.config).stem
    else:
        base = TrainConfig.preset(args.preset).to_dict()
        name = args.name or args.preset
    for kv in args.set:
        k, _, v = kv.partition("=")
        base[k] = parse_value(v)
    if args.device:
        base["device"] = args.device
    config = TrainConfig.from_dict(base)
    folds = [int(f) for f in args.folds.split(",")]

    from trainable.shards import load_shards  # the data step's reader

    t_load = time.perf_counter()
    data = load_shards(args.shards)
    t_load = time.perf_counter() - t_load
    n_mels = data.params.n_mels
    info = machine()
    print(f"machine: {json.dumps(info)}")
    print(f"shards: {args.shards} ({len(data)} clips, {tuple(data.x.shape[1:])}, loaded in {t_load:.1f}s)")
    print(f"config {name}: {config.to_json()}")
    print(f"parameters: {count_parameters(build_model(config, n_mels)):,}", flush=True)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"cv_{name}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "config": config.to_dict(),
        "shards": args.shards,
        "feature_params": data.params.to_dict(),
        "machine": info,
        "started": stamp,
        "folds": {},
        "complete": False,
    }

    t_all = time.perf_counter()
    for fold in folds:
        val = data.fold == fold
        trainer = FoldTrainer(config, data.x[~val], data.y[~val], data.x[val], data.y[val], fold=fold)
        history = []
        for m in trainer:
            history.append(m)
            print(
                f"fold {fold} epoch {m['epoch']:3d}/{config.epochs}  train_loss {m['train_loss']:.4f}  "
                f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  {m['epoch_seconds']:.1f}s",
                flush=True,
            )
        secs = [h["epoch_seconds"] for h in history]
        result["folds"][str(fold)] = {
            "val_acc": history[-1]["val_acc"],
            "val_loss": history[-1]["val_loss"],
            "best_val_acc": max(h["val_acc"] for h in history),
            "seconds": sum(secs),
            "median_epoch_seconds": statistics.median(secs),
            # what the fold trained and was scored on: its own clips only, never a training clip
            "train_clips": int((~val).sum()),
            "val_clips": int(val.sum()),
            "history": history,
        }
        accs = [f["val_acc"] for f in result["folds"].values()]
        result["mean_acc"] = statistics.mean(accs)
        result["std_acc"] = statistics.pstdev(accs)
        result["elapsed_seconds"] = time.perf_counter() - t_all
        out.write_text(json.dumps(result, indent=1))
        print(
            f"== fold {fold}: val_acc {history[-1]['val_acc']:.4f} ({sum(secs):.0f}s); "
            f"mean so far {result['mean_acc']:.4f} over {len(accs)} fold(s)",
            flush=True,
        )

    result["complete"] = True
    out.write_text(json.dumps(result, indent=1))
    print("per-fold accuracy: " + "  ".join(f"{k}: {v['val_acc']:.4f}" for k, v in result["folds"].items()))
    print(
        f"mean accuracy over {len(folds)} folds: {result['mean_acc']:.4f} (std {result['std_acc']:.4f}); "
        f"{result['elapsed_seconds'] / 60:.1f} min; result: {out}"
    )


if __name__ == "__main__":
    main()

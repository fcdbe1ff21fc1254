"""Every GPU measurement of issue 10 in one run of at most 8 minutes, written as one JSON file.

    python bench/gpu_bench.py --shards data/carry/shards --out $OUT/gpu_bench.json [--budget 450]
    python bench/gpu_bench.py --smoke --shards <tiny shards> --out /tmp/x.json    # CPU, ~2 minutes

On the device machine it is started by bench/gpu_run.sh, which installs the project's dependencies
from the offline bundle first (that script's header has the exact device-tool command). In order:

  1. machine: GPU name, driver, CUDA, torch, Ray, commit, the command.
  2. layouts (the `full` preset, real shards): FLOPs of one training fold-epoch (torch's
     FlopCounterMode over a real `FoldTrainer.train_epoch`), then for each layout the steady-state
     fold-epochs per second with the product's own Ray actors: `alone` (1 fold, 1 GPU), `workers`
     (5 FoldWorkers at 0.2 GPU each: the layout before issue 10) and `packed` (1 PackedFoldWorker
     with all 5 folds); achieved TFLOP/s = fold-epochs/s x FLOPs per fold-epoch.
  3. full: `esc50 search --space full --trials 1 --gpus-per-fold 0.2` (layout auto = packed)
     through the product, its wall time and 5-fold mean from MLflow (goal: <= 2 minutes, within
     1 point of 90.6%), then `esc50 promote` and `esc50 predict` with the champion on this host.
  4. search: `esc50 search --space default` with ASHA on this one GPU, several packed trials sharing
     it (--gpus-per-fold 0.05: a trial holds 0.25 GPU), stopped by SIGINT after the time left
     (at most --search-minutes); trials completed/pruned/failed (MLflow) per hour, and the GPU's
     busy fraction sampled every 0.5 s with nvidia-smi during steps 3 and 4 (goal: >= 80%).

`--ray-address host:port` runs every step on that running Ray instead of starting one each (the smoke
test's way to save start-ups); bench/gpu_run.sh does not pass it, as step 3's time is meant to be a
user's `esc50 search` on a fresh machine, Ray's start included. Each step gets what is left of `--budget` seconds (a step that would not fit is recorded as
skipped), and the JSON is rewritten after every step, so a run cut short keeps what it measured.
--smoke: on CPU with tiny settings and 2 folds (what tests/test_gpu_bench.py runs): the same steps and fields.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from layout_bench import actor_rates, commit, fold_epoch_flops, load_data  # noqa: E402

FULL_ACCURACY = 0.906  # the README's 5-fold mean of the full preset (bench/cv_accuracy.py, H100)
CLI = [sys.executable, "-m", "search"]  # `esc50` without an installed entry point


class Sampler:
    """GPU utilization every `period` seconds from nvidia-smi, in a thread; no GPU: no samples."""

    def __init__(self, period: float = 0.5) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        if shutil.which("nvidia-smi"):
            ms = int(period * 1000)
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={ms}"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip().split(",")[0])))
            except ValueError:
                pass

    def busy(self, t0: float, t1: float) -> dict[str, Any]:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return {
            "samples": len(vals),
            "busy_fraction": (statistics.mean(vals) / 100) if vals else None,
            "utilization_percent": vals,
        }

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def gpu_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = q.stdout.strip()
        info["driver"] = q.stdout.strip().split(",")[1].strip() if q.returncode == 0 and q.stdout else None
    return info


def run_cli(
    args: list[str],
    timeout: float,
    env: dict[str, str],
    interrupt_after: float | None = None,
    started: Any = None,
) -> dict:
    """`python -m search ARGS` with a wall-clock limit (SIGKILL at `timeout` s). With `interrupt_after`:
    SIGINT (as Ctrl-C: Tune stops its trials and saves) that many seconds after `started()` (polled
    every second) first returns true, or after the start if no `started` is given."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*CLI, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        interrupted = killed = False
        t_started = None if started is not None else t0
        asked = -1.0  # `started()` reads MLflow: once a second; the exit is seen within 0.2 s
        while proc.poll() is None:
            now = time.perf_counter()
            if t_started is None and now - asked >= 1.0:
                asked = now
                if started():
                    t_started = now
            if now - t0 > timeout:
                killed = True
                proc.kill()
                break
            if interrupt_after is not None and not interrupted and t_started is not None:
                if now - t_started >= interrupt_after:
                    interrupted = True
                    proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        proc.wait()
        log.seek(0)
        out = log.read()
    return {
        "command": ["esc50", *args],
        "rc": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "seconds_from_first_trial": None if t_started is None else time.perf_counter() - t_started,
        "interrupted": interrupted,
        "killed": killed,
        "output_tail": out[-3000:],
    }


def trial_runs(tracking_uri: str, search: str) -> list[dict[str, Any]]:
    """The search's trial runs in MLflow: status tag, epochs logged, last cv_acc_mean."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("esc50")
    if exp is None:
        return []
    runs = c.search_runs(
        [exp.experiment_id],
        f"tags.`esc50.role` = 'trial' and tags.`esc50.search` = '{search}'",
        max_results=1000,
    )
    return [
        {
            "status": r.data.tags.get("esc50.status"),
            "cv_acc_mean": r.data.metrics.get("cv_acc_mean"),
            "cv_acc_std": r.data.metrics.get("cv_acc_std"),
            "epoch": r.data.metrics.get("epoch"),
            "epoch_seconds": r.data.metrics.get("epoch_seconds"),
        }
        for r in runs
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="prepared ESC-50 shards (the real ones on the GPU)")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    p.add_argument("--layout-epochs", type=int, default=6, help="epochs per layout (the first is warm-up)")
    p.add_argument("--search-minutes", type=float, default=8.0, help="the ASHA search at most this long")
    p.add_argument("--skip", default="", help="steps to skip: layouts,full,search (comma-separated)")
    p.add_argument(
        "--commit", default=None, help="the commit measured (default: git, else data/carry/COMMIT)"
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and data: checks the script itself")
    p.add_argument(
        "--ray-address",
        default=None,
        help="run every step on this running Ray (host:port) instead of starting one each, as "
        "`esc50 search` on a fresh machine does. The smoke test passes its session's (three Ray "
        "start-ups fewer; tests/test_resume.py covers a search that starts its own)",
    )
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    skip = {s for s in args.skip.split(",") if s}
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["MLFLOW_TRACKING_URI"] = tracking
    carry_commit = ROOT / "data" / "carry" / "COMMIT"
    result: dict[str, Any] = {
        "what": "issue 10 GPU measurements: fold layouts, the full trial through esc50 search, an ASHA search",
        "smoke": args.smoke,
        "command": [sys.executable, *sys.argv] if argv is None else ["bench/gpu_bench.py", *argv],
        "commit": args.commit
        or commit()
        or (carry_commit.read_text().strip() if carry_commit.exists() else None),
        "machine": gpu_info(),
        "budget_seconds": args.budget,
        "steps": {},
    }

    def save() -> None:
        result["seconds"] = time.perf_counter() - t_start
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out_path)

    save()
    sampler = Sampler()
    gpu = not args.smoke
    try:
        # ---- 2. layouts -------------------------------------------------------------------------
        if "layouts" in skip:
            result["steps"]["layouts"] = {"skipped": "--skip"}
        else:
            result["steps"]["layouts"] = layouts(args, gpu)
        save()
        # ---- 3. the full trial through the product ----------------------------------------------
        search_args = ["--shards", args.shards, "--storage", str(work / "runs"), "--tracking-uri", tracking]
        if "full" in skip or left() < (60 if args.smoke else 150):
            result["steps"]["full"] = {"skipped": "--skip" if "full" in skip else f"{left():.0f} s left"}
        else:
            full_args = ["search", "--space", "full", "--trials", "1", "--name", "full", "-q", *search_args]
            full_args += ["--smoke"] if args.smoke else ["--gpus-per-fold", "0.2", "--cpus-per-fold", "1"]
            full_args += ["--address", args.ray_address] if args.ray_address else []
            t0 = time.time()
            run = run_cli(full_args, timeout=max(30.0, left() - (40 if args.smoke else 90)), env=env)
            run["gpu"] = sampler.busy(t0, time.time())
            runs = trial_runs(tracking, "full")
            run["trials"] = runs
            if runs and runs[0]["cv_acc_mean"] is not None:
                acc = runs[0]["cv_acc_mean"]
                run["cv_acc_mean"] = acc
                run["within_1_point_of_90_6"] = abs(acc - FULL_ACCURACY) <= 0.01
            run["goal_2_minutes_met"] = run["rc"] == 0 and run["seconds"] <= 120
            result["steps"]["full"] = run
            save()
            if run["rc"] == 0:
                promote = run_cli(
                    ["promote", "--search", "full", "--tracking-uri", tracking], timeout=120, env=env
                )
                result["steps"]["promote"] = promote
                save()
                if promote["rc"] == 0:
                    clip = work / "clip.wav"
                    _write_clip(clip)
                    result["steps"]["predict"] = run_cli(
                        ["predict", str(clip), "--json", "--tracking-uri", tracking], timeout=90, env=env
                    )
                    save()
        # ---- 4. an ASHA search of the default space on this GPU ---------------------------------
        if "search" in skip or left() < (90 if args.smoke else 135):
            result["steps"]["search"] = {"skipped": "--skip" if "search" in skip else f"{left():.0f} s left"}
        else:
            # start-up (Ray, the first trial) before the timed minutes, shutdown after them
            minutes = min(args.search_minutes, (left() - (60 if args.smoke else 75)) / 60)
            s_args = ["search", "--space", "default", "--name", "asha", "-q", *search_args]
            s_args += ["--address", args.ray_address] if args.ray_address else []
            s_args += (
                ["--smoke", "--trials", "50", "--concurrency", "2"]
                if args.smoke
                else ["--trials", "500", "--gpus-per-fold", "0.05", "--cpus-per-fold", "0.5"]
            )
            t0 = time.time()
            first: list[float] = []

            def started() -> bool:  # the first trial's run is in MLflow: the search is running
                try:  # (read only once the store exists: the CLI creates it)
                    if not first and (work / "mlflow.db").exists() and trial_runs(tracking, "asha"):
                        first.append(time.time())
                except Exception:  # the store mid-write: ask again next second
                    pass
                return bool(first)

            run = run_cli(s_args, timeout=left() - 5, env=env, interrupt_after=minutes * 60, started=started)
            run["gpu"] = sampler.busy(first[0] if first else t0, time.time())
            runs = trial_runs(tracking, "asha")
            counts: dict[str, int] = {}
            for r in runs:
                counts[r["status"] or "unknown"] = counts.get(r["status"] or "unknown", 0) + 1
            ended = sum(v for k, v in counts.items() if k in ("completed", "pruned"))
            run.update(
                minutes=minutes,
                counts=counts,
                ended_per_hour=ended / ((run["seconds_from_first_trial"] or run["seconds"]) / 3600),
                trials=runs,
            )
            busy = run["gpu"]["busy_fraction"]
            run["goal_80_percent_busy_met"] = None if busy is None else busy >= 0.8
            result["steps"]["search"] = run
        save()
    finally:
        sampler.close()
        result["seconds"] = time.perf_counter() - t_start
        save()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, default=str))
    print(f"wrote {out_path} in {result['seconds']:.0f} s")
    return 0


def layouts(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """Step 2: FLOPs of a fold-epoch, then fold-epochs/s and TFLOP/s of each layout."""
    import ray
    import torch

    from trainable.config import PRESETS
    from trainable.cv import share_data

    if args.smoke:
        config = {**PRESETS["smoke"], "epochs": args.layout_epochs}
        data = load_data(args.shards, 0)
    else:
        # The schedule does not change the speed; its warm-up must fit in the few epochs timed.
        config = {**PRESETS["full"], "epochs": args.layout_epochs, "warmup_epochs": 1.0, "device": "cuda"}
        data = load_data(args.shards, 0)
    out: dict[str, Any] = {"config": config, "clips": len(data)}
    t0 = time.perf_counter()
    out["flops_per_fold_epoch"] = fold_epoch_flops(config, data, fold=1, device="cuda" if gpu else "cpu")
    out["flop_count_seconds"] = time.perf_counter() - t0
    if gpu:
        torch.cuda.empty_cache()
    # Smoke: 2 folds (as `esc50 search --smoke`), enough to show per-fold counting; each fold is
    # an actor whose start-up (importing torch) is most of the smoke's time on 2 cores.
    folds = (1, 2) if args.smoke else (1, 2, 3, 4, 5)
    out["folds"] = list(folds)
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, 6),
            num_gpus=1 if gpu else 0,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _system_config={"worker_niceness": 0},
        )
    try:
        shared = share_data(data, folds)
        cpus = 1.0 if gpu else 0.4
        # alone: the whole GPU for one fold; workers: 5 x 0.2 (the layout before issue 10); packed: 5 x 0.2 = 1
        plan = [("alone", 1.0), ("workers", 0.2), ("packed", 0.2)]
        runs = []
        for layout, g in plan:
            r = actor_rates(shared, folds, config, layout, args.layout_epochs, cpus, g if gpu else 0.0)
            r["gpus_per_fold"] = g if gpu else 0.0
            r["tflops"] = r["fold_epochs_per_s"] * out["flops_per_fold_epoch"] / 1e12
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "epoch_seconds"}), flush=True)
        out["runs"] = runs
    finally:
        ray.shutdown()
    return out


def _write_clip(path: Path, seconds: float = 5.0, rate: int = 22050) -> None:
    """A 5 s test tone with noise (the prediction itself is not the point: it runs on this host)."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), rate)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark `esc50 prepare` and the shard reader on a real ESC-50 copy (2000 clips).

    python bench/prepare_bench.py [--source ../shared/esc50] [--repeats 3] [--loads 7] [--out FILE]

Measures, in one run on this machine (other jobs may share the CPU: medians, and ratios against a
baseline measured in the same run, interleaved with ours):
  * prepare wall time of `esc50 prepare` (a fresh process, fresh output dir, default features)
    vs a plain per-clip loop over 2 processes (decode, mono, resample to 22.05 kHz, 64-mel dB per
    clip), and decoding alone over 2 processes, which bounds what any pipeline can do;
  * load time of all 5 shards into one tensor (median of several);
  * bytes per clip for each storage dtype, and the cost of other feature settings (--sweep).
Every arm reports how many clips it processed (`clips_processed`). Writes
bench/results/prepare_bench.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE_RATE, BASELINE_MELS = 22050, 64
CLIPS_DONE = "clips done: "  # a child's last line: how many clips it really processed


# ---- the baseline: what one would write without this project -------------------------------------
def _baseline_clip(path: str) -> object:
    import soundfile as sf
    import torch
    import torchaudio

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    x = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), rate, BASELINE_RATE)
    n = BASELINE_RATE * 5
    x = x[:n] if x.numel() >= n else torch.nn.functional.pad(x, (0, n - x.numel()))
    mel = torchaudio.transforms.MelSpectrogram(
        BASELINE_RATE, n_fft=1024, hop_length=512, n_mels=BASELINE_MELS
    )
    return torchaudio.transforms.AmplitudeToDB(top_db=80)(mel(x)).numpy()


def _decode_clip(path: str) -> int:
    import soundfile as sf

    return len(sf.read(path, dtype="float32")[0])


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_ours(source: str, out: str) -> None:
    """Child process: `esc50 prepare`, then stop the fork server so its workers' CPU time is counted."""
    from multiprocessing import forkserver

    from search.cli import main
    from trainable.shards import load_shards

    rc = main(["prepare", "--source", source, "--out", out])
    forkserver._forkserver._stop()  # waits for it: its reaped workers' rusage reaches our parent
    if rc == 0:
        print(f"{CLIPS_DONE}{len(load_shards(out))}", flush=True)  # read back: what was written
    sys.exit(rc)


def run_pool(kind: str, source: str) -> None:
    """Child process: the plain per-clip loop (or decoding alone) over 2 processes."""
    import multiprocessing as mp

    import pandas as pd

    meta = pd.read_csv(Path(source) / "meta" / "esc50.csv")
    audio = Path(source) / "audio"
    by_stem = {p.stem: str(p) for p in audio.iterdir()}
    paths = [by_stem[Path(f).stem] for f in meta["filename"]]
    fn = _baseline_clip if kind == "baseline" else _decode_clip
    init = _worker_init if kind == "baseline" else None  # decoding alone needs no torch
    with mp.get_context("spawn").Pool(2, initializer=init) as pool:
        out = pool.map(fn, paths, chunksize=16)
    assert len(out) == len(paths)
    print(f"{CLIPS_DONE}{sum(1 for x in out if x is not None)}", flush=True)


def timed(cmd: list[str]) -> tuple[float, float, int | None]:
    """Wall seconds and CPU seconds (user + sys of the process tree) of one command, and the clips
    it says it processed (a `clips done: N` line; None without one)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = [int(x.removeprefix(CLIPS_DONE)) for x in proc.stdout.splitlines() if x.startswith(CLIPS_DONE)]
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), (done or [None])[-1]


# ---- measurements ------------------------------------------------------------------------------
def machine() -> dict:
    import pyarrow
    import torch
    import torchaudio

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    from machine import provenance  # bench/machine.py: command, commit, versions

    return {
        **provenance(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "pyarrow": pyarrow.__version__,
    }


def bench_prepare(source: str, repeats: int, tmp: Path) -> dict:
    me = [sys.executable, __file__, "--source", source]
    cmds = {
        "ours": lambda i: [*me, "--child", "ours", "--child-out", str(tmp / f"run{i}")],
        "baseline": lambda i: [*me, "--child", "baseline"],
        "decode_only": lambda i: [*me, "--child", "decode"],
    }
    wall: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    clips: dict[str, list[int | None]] = {k: [] for k in cmds}
    for i in range(repeats):  # interleaved, so a busy neighbour hurts all three alike
        for k, cmd in cmds.items():
            w, c, n = timed(cmd(i))
            wall[k].append(w)
            cpu[k].append(c)
            clips[k].append(n)
        print(
            f"  round {i + 1} (wall / cpu s): "
            + ", ".join(f"{k} {wall[k][-1]:.1f} / {cpu[k][-1]:.1f}" for k in cmds),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "clips_processed": clips,  # per arm and round: every clip of the source, or a bug
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": med,
        "median_cpu_s": med_cpu,
        "speedup_vs_baseline_wall": med["baseline"] / med["ours"],
        "speedup_vs_baseline_cpu": med_cpu["baseline"] / med_cpu["ours"],
    }


def bench_dtypes(source: str, tmp: Path, loads: int) -> dict:
    """Features computed once, written in each storage dtype by the product's writer; then loaded."""
    import numpy as np

    from search.data.metadata import read_metadata
    from search.data.prepare import compute_features
    from trainable.model.features import FeatureParams
    from trainable.shards import load_shards, write_dataset

    meta = read_metadata(source)
    base = FeatureParams()
    spec = compute_features(list(meta.audio), base, workers=2, progress=False)
    out = {}
    for dtype in ("float32", "float16", "uint8"):
        params = FeatureParams(**{**base.to_dict(), "storage_dtype": dtype})
        uri = str(tmp / f"dtype-{dtype}")
        nbytes = write_dataset(uri, meta.columns, spec, params, meta.classes, {"fingerprint": dtype})
        load_shards(uri)  # warm the page cache, as a search's driver would find it
        secs, cpu = [], []
        for _ in range(loads):
            t, c = time.perf_counter(), time.process_time()
            data = load_shards(uri, expect=base)
            secs.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        err = float(
            np.abs(data.x[:, 0].numpy() - spec[np.argsort(meta.columns["fold"], kind="stable")]).max()
        )
        out[dtype] = {
            "bytes": nbytes,
            "bytes_per_clip": nbytes / len(meta),
            "raw_bytes_per_clip": int(spec[0].size * {"float32": 4, "float16": 2, "uint8": 1}[dtype]),
            "load_all_5_median_s": statistics.median(secs),
            "load_all_5_s": secs,
            "load_all_5_cpu_median_s": statistics.median(cpu),
            "max_abs_error_db": err,
        }
        print(
            f"  {dtype}: {nbytes / len(meta) / 1e3:.1f} kB/clip, load {statistics.median(secs):.3f} s "
            f"(cpu {statistics.median(cpu):.3f} s), max error {err:.3f} dB",
            flush=True,
        )
    return out


def bench_sweep(source: str, tmp: Path) -> dict:
    """Prepare cost of other feature settings (one run each; accuracy is the trainable's bench)."""
    from search.data.metadata import read_metadata

    esc50 = str(Path(sys.executable).with_name("esc50"))
    settings = {
        "default 22.05k/1024/512/64": [],
        "seed 44.1k/1024/512/64 no top_db": ["--sample-rate", "44100", "--top-db", "none"],
        "22.05k/1024/256/128": ["--hop", "256", "--n-mels", "128"],
        "16k/512/256/64": ["--sample-rate", "16000", "--n-fft", "512", "--hop", "256"],
    }
    out = {}
    for name, args in settings.items():
        uri = tmp / ("sweep-" + "".join(c if c.isalnum() else "_" for c in name))
        secs, _, _ = timed([esc50, "prepare", "--source", source, "--out", str(uri), *args])
        manifest = json.loads((uri / "_manifest.json").read_text())
        n = len(read_metadata(source))
        out[name] = {"seconds": secs, "shape": manifest["shape"], "bytes_per_clip": manifest["bytes"] / n}
        print(
            f"  {name}: {secs:.1f} s, shape {manifest['shape']}, {manifest['bytes'] / n / 1e3:.1f} kB/clip",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=os.environ.get("ESC50_SOURCE", str(ROOT.parent / "shared" / "esc50")))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="also time other feature settings")
    ap.add_argument("--out", help="result JSON (default bench/results/prepare_bench.json)")
    ap.add_argument("--child", choices=("ours", "baseline", "decode"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "ours":
        run_ours(args.source, args.child_out)
    if args.child:
        run_pool(args.child, args.source)
        return
    source = str(Path(args.source).resolve())
    report = {"machine": machine(), "source": source}
    print(json.dumps(report["machine"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        print("prepare wall time (esc50 prepare vs per-clip loop over 2 processes):", flush=True)
        report["prepare"] = bench_prepare(source, args.repeats, Path(tmp))
        print("storage dtypes:", flush=True)
        report["dtypes"] = bench_dtypes(source, Path(tmp), args.loads)
        if args.sweep:
            print("feature settings:", flush=True)
            report["sweep"] = bench_sweep(source, Path(tmp))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    r = report["prepare"]
    p, c = r["median_wall_s"], r["median_cpu_s"]
    print(
        f"\nprepare (median wall / cpu s): ours {p['ours']:.1f} / {c['ours']:.1f} (goal <= 30 s wall); "
        f"baseline per-clip loop {p['baseline']:.1f} / {c['baseline']:.1f} -> "
        f"{r['speedup_vs_baseline_wall']:.2f}x wall, {r['speedup_vs_baseline_cpu']:.2f}x cpu; "
        f"decoding alone {p['decode_only']:.1f} / {c['decode_only']:.1f}"
    )
    d = report["dtypes"]
    print(
        "load all 5 shards: "
        + ", ".join(f"{k} {v['load_all_5_median_s']:.3f} s" for k, v in d.items())
        + " (goal <= 1 s); bytes/clip: "
        + ", ".join(f"{k} {v['bytes_per_clip'] / 1e3:.1f} kB" for k, v in d.items())
    )
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "prepare_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Prediction latency per 5 s clip and batch throughput of the promoted model, on this machine.

Measures the MLflow pyfunc exactly as `esc50 predict` and `mlflow models serve` call it (a DataFrame
with a waveform and its rate: resampling, log-mel, every fold model, mean), on real ESC-50 clips:

  - latency: one clip per `predict` call, median and p90 over `--clips` clips (after warm-up);
  - throughput: `--batch` clips per call;
  - baseline, in the same run: the same ensemble called directly (`FoldEnsemble.predict_clips`,
    no MLflow), so the ratio is what the pyfunc wrapper (schema checks, DataFrames) costs;
  - decoding a clip (soundfile), which `esc50 predict` adds per file.

    python bench/predict_bench.py --model models:/esc50-cnn@champion --tracking-uri sqlite:///mlflow.db
    python bench/predict_bench.py --preset full --clips 100         # random weights: a cost estimate only

The README's figure times a trained, promoted model (--model): the result JSON records the
registered version's tags (search, trial, cv_acc_mean, bbc_cv_acc, commit) and the model's
accuracy on the timed clips (labels from the ESC-50 metadata beside --audio), which says whether it
is trained (random weights score ~2%, chance for 50 classes). Without --model, a 5-fold ensemble of
the preset's architecture with random weights is logged as the same pyfunc `esc50 promote` builds,
into a temporary MLflow store (product features: 22.05 kHz, 64 mels), and the JSON says
`"trained": false`. Clips come from --audio (default: ../shared/esc50/audio). Writes
bench/results/predict_<time>.json (or --json) with the raw per-clip timings.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # as the other benchmarks (see bench/machine.py)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AUDIO = ROOT.parent / "shared" / "esc50" / "audio"


def random_model(preset: str, work: Path) -> str:
    """Log a 5-fold ensemble of `preset` (random weights) as the promoted pyfunc; returns its URI."""
    import mlflow

    from search.release.promote import log_model
    from search.store import client
    from trainable.config import TrainConfig
    from trainable.model.features import FeatureParams
    from trainable.model.networks import N_CLASSES, build_model

    cfg = TrainConfig.preset(preset)
    params = FeatureParams()
    states = {}
    for k in (1, 2, 3, 4, 5):
        torch.manual_seed(k)
        net = build_model(cfg, params.n_mels)
        states[k] = {
            "config": cfg.to_dict(),
            "fold": k,
            "epoch": 0,
            "n_mels": params.n_mels,
            "n_classes": N_CLASSES,
            "model": net.state_dict(),
        }
    meta = {
        "format": 1,
        "config": cfg.to_dict(),
        "features": params.to_dict(),
        "fingerprint": None,
        "classes": [f"class_{i}" for i in range(N_CLASSES)],
        "folds": [1, 2, 3, 4, 5],
        "epoch": 0,
    }
    client(f"sqlite:///{work / 'mlflow.db'}")
    exp = mlflow.create_experiment("predict-bench", artifact_location=str(work / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        return log_model(meta, states, work / "model").model_uri


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model URI (default: a random-weight ensemble of --preset)")
    ap.add_argument("--tracking-uri", help="for a models:/ URI")
    ap.add_argument("--preset", default="compact", help="architecture without --model (default %(default)s)")
    ap.add_argument("--audio", default=str(DEFAULT_AUDIO), help="folder of clips (default %(default)s)")
    ap.add_argument(
        "--clips", type=int, default=200, help="clips for the latency median (default %(default)s)"
    )
    ap.add_argument(
        "--batch", type=int, default=64, help="clips per call for throughput (default %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="the result file (default bench/results/predict_<time>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import mlflow

    from search.store import client
    from trainable.audio import decode

    files = sorted(p for p in Path(args.audio).iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg"))
    if not files:
        sys.exit(f"no audio files in {args.audio}")
    files = files[:: max(1, len(files) // args.clips)][: args.clips]
    decode_s = [timed(decode, f) for f in files]
    clips = [decode(f) for f in files]

    with tempfile.TemporaryDirectory(prefix="predict_bench_") as tmp:
        if args.model:
            client(args.tracking_uri, must_exist=True)
            uri = args.model
        else:
            uri = random_model(args.preset, Path(tmp))
        model = mlflow.pyfunc.load_model(uri)
        ensemble = model.unwrap_python_model().ensemble

        def frame(batch):
            return pd.DataFrame({"waveform": [w for w, _ in batch], "sample_rate": [r for _, r in batch]})

        for c in clips[:3]:  # warm-up: kernels, resampler, allocator
            model.predict(frame([c]))
            ensemble.predict_clips([c])
        pyfunc_s, answers = [], []
        for c in clips:
            t0 = time.perf_counter()
            answers.append(model.predict(frame([c])))
            pyfunc_s.append(time.perf_counter() - t0)
        raw_s = [timed(ensemble.predict_clips, [c]) for c in clips]
        batch = (clips * (args.batch // len(clips) + 1))[: args.batch]
        batch_frame = frame(batch)
        batch_s = min(timed(model.predict, batch_frame) for _ in range(3))
        batch_raw_s = min(timed(ensemble.predict_clips, batch) for _ in range(3))

    def ms(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median_ms": 1000 * statistics.median(xs), "p90_ms": 1000 * xs[int(0.9 * (len(xs) - 1))]}

    seconds = [len(w) / r for w, r in clips]
    predicted = [_label(a) for a in answers]
    truth = _categories(Path(args.audio))
    known = [(p, truth[f.name]) for p, f in zip(predicted, files, strict=True) if f.name in truth]
    out = {
        "machine": {**machine(), "load_average_1m": os.getloadavg()[0]},
        "command": ["python", "bench/predict_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "model": args.model or f"random-weight 5-fold ensemble, preset {args.preset}",
        "trained": bool(args.model),
        "version_tags": _version_tags(args.model, args.tracking_uri) if args.model else None,
        "accuracy_on_timed_clips": sum(p == t for p, t in known) / len(known) if known else None,
        "raw": {"decode_s": decode_s, "pyfunc_s": pyfunc_s, "raw_s": raw_s, "batch_s": batch_s},
        "features": ensemble.params.to_dict(),
        "folds": len(ensemble.folds),
        "parameters_per_fold": sum(p.numel() for p in ensemble.nets[0].parameters()),
        "clips": len(clips),
        "clip_seconds_median": statistics.median(seconds),
        "rates": sorted({r for _, r in clips}),
        "decode": ms(decode_s),
        "latency_pyfunc": ms(pyfunc_s),
        "latency_raw_ensemble": ms(raw_s),
        "pyfunc_overhead_ratio": statistics.median(pyfunc_s) / statistics.median(raw_s),
        "batch": args.batch,
        "throughput_pyfunc_clips_per_s": args.batch / batch_s,
        "throughput_raw_clips_per_s": args.batch / batch_raw_s,
        "batch_speedup_vs_one_by_one": (args.batch / batch_s) * statistics.median(pyfunc_s),
    }
    m = out["machine"]
    print(
        f"machine: {m.get('cpu_model', m['processor'])}, {m['cpus']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), {m['platform']}; load average {m['load_average_1m']:.1f}"
    )
    print(
        f"model: {out['model']}: {out['folds']} folds x {out['parameters_per_fold']:,} parameters; "
        f"features {ensemble.params.sample_rate} Hz, {ensemble.params.n_mels} mels x {ensemble.params.num_frames} frames"
    )
    print(
        f"clips: {len(clips)} real clips from {args.audio} ({out['clip_seconds_median']:.2f} s, {out['rates']} Hz)"
    )
    print(
        f"decode one file:              median {out['decode']['median_ms']:7.1f} ms   p90 {out['decode']['p90_ms']:7.1f} ms"
    )
    print(
        f"predict one clip (pyfunc):    median {out['latency_pyfunc']['median_ms']:7.1f} ms   p90 {out['latency_pyfunc']['p90_ms']:7.1f} ms"
    )
    print(
        f"baseline, ensemble directly:  median {out['latency_raw_ensemble']['median_ms']:7.1f} ms   p90 {out['latency_raw_ensemble']['p90_ms']:7.1f} ms"
        f"   (pyfunc / baseline = {out['pyfunc_overhead_ratio']:.2f})"
    )
    print(
        f"throughput, {args.batch} clips per call: pyfunc {out['throughput_pyfunc_clips_per_s']:.1f} clips/s, "
        f"directly {out['throughput_raw_clips_per_s']:.1f} clips/s "
        f"({out['batch_speedup_vs_one_by_one']:.2f}x one clip per call)"
    )
    if out["accuracy_on_timed_clips"] is not None:
        print(
            f"accuracy on the timed clips: {out['accuracy_on_timed_clips']:.3f} (trained: {out['trained']})"
        )
    from datetime import UTC, datetime

    dest = Path(args.json or ROOT / "bench" / "results" / f"predict_{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"result: {dest}")
    return 0


def _label(answer) -> str | None:
    """The top label of one pyfunc answer (a DataFrame or a list of dicts)."""
    rows = answer.to_dict("records") if hasattr(answer, "to_dict") else list(answer)
    return rows[0].get("label") if rows else None


def _categories(audio: Path) -> dict[str, str]:
    """file name -> category from the ESC-50 metadata beside the audio folder ({} without it)."""
    meta = audio.parent / "meta" / "esc50.csv"
    if not meta.exists():
        return {}
    table = pd.read_csv(meta)
    return {
        Path(f).stem + ext: c
        for f, c in zip(table.filename, table.category, strict=True)
        for ext in (".wav", ".ogg", ".flac")
    }


def _version_tags(uri: str, tracking: str | None) -> dict[str, str] | None:
    """The registered version's tags of a models:/NAME@ALIAS or models:/NAME/VERSION URI."""
    from search.store import client

    if not uri.startswith("models:/"):
        return None
    c = client(tracking, must_exist=True)
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = c.get_model_version_by_alias(name, alias)
    else:
        name, version = ref.rsplit("/", 1)
        mv = c.get_model_version(name, version)
    keep = ("esc50.search", "esc50.trial", "cv_acc_mean", "bbc_cv_acc", "bbc_cv_acc_lo", "bbc_cv_acc_hi",
            "mlflow.source.git.commit", "esc50.fingerprint")  # fmt: skip
    return {"version": str(mv.version), **{k: mv.tags.get(k, "") for k in keep}}


if __name__ == "__main__":
    sys.exit(main())

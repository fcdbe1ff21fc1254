"""Data path: clips/s delivered ready for the training step, ours vs the seed's, in one run.

Seed path (the notebook's): a torch Dataset whose __getitem__ decodes the audio file with
soundfile, mixes to mono, resamples and computes the log-mel (the seed's 44.1 kHz features), in
a DataLoader (batch 128, shuffled), measured with 0 and with 2 worker processes; the faster is
the baseline.

Our path (trainable/fold.py): the training folds' features resident on the training device,
one batch = index the device tensors with a slice of the epoch's permutation, then augment the
whole batch on the device (the "compact" preset's crop, roll, gain, SpecAugment, mixup).

Also measured: the split of one training step (compact preset, CPU) into data (index +
augment), forward+backward, and optimizer+LR step; the goal is < 5% outside forward/backward.

    python bench/data_path_bench.py [--shards data/shards/<id>] [--clips 384] [--device cpu]
        [--source ESC-50 copy] [--batches 200] [--set KEY=VALUE] [--seed-workers 0,2] [--out FILE]

Prints the machine, medians over repeats, and the ratio; writes bench/results/data_path_<time>.json
(or --out). What each path delivered (clips, batch shape) is recorded beside its rate.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # see bench/cv_accuracy.py

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402
from machine import machine  # bench/machine.py: scripts run as `python bench/<name>.py`

from trainable.config import TrainConfig  # noqa: E402
from trainable.fold import FoldTrainer  # noqa: E402
from trainable.model.features import FeatureParams, LogMel, fit_length  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ESC50 = Path(os.environ.get("ESC50_SOURCE", "/work/shared/esc50"))  # default of --source


# ---- the seed's data path ----------------------------------------------------------------------


class SeedDataset(torch.utils.data.Dataset):
    """The notebook's per-item pipeline: decode, mono, resample, 5 s, mel, dB — every epoch."""

    def __init__(self, files: list[Path], labels: list[int], params: FeatureParams) -> None:
        self.files, self.labels, self.params = files, labels, params
        self.mel = LogMel(params)
        self.resamplers: dict[int, torchaudio.transforms.Resample] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data, rate = sf.read(str(self.files[i]), dtype="float32", always_2d=True)
        wave = torch.from_numpy(data.mean(axis=1))
        if rate != self.params.sample_rate:
            if rate not in self.resamplers:
                self.resamplers[rate] = torchaudio.transforms.Resample(rate, self.params.sample_rate)
            wave = self.resamplers[rate](wave)
        wave = fit_length(wave, self.params.num_samples)
        return self.mel(wave)[0].unsqueeze(0), self.labels[i]


def esc50_files(n: int, source: Path = ESC50) -> tuple[list[Path], list[int]]:
    rows = list(csv.DictReader(open(source / "meta" / "esc50.csv")))[:n]
    files = []
    for r in rows:
        stem = r["filename"].rsplit(".", 1)[0]
        found = [
            p for p in (source / "audio" / f"{stem}{e}" for e in (".wav", ".ogg", ".flac")) if p.exists()
        ]
        files.append(found[0])
    return files, [int(r["target"]) for r in rows]


def seed_clips_per_second(files, labels, workers: int, batch: int = 128) -> tuple[float, int, list[int]]:
    """Clips per second of the seed's loader, the clips it delivered and the shape of a batch."""
    ds = SeedDataset(files, labels, FeatureParams.seed())
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False
    )
    t0 = time.perf_counter()
    n, shape = 0, []
    for x, _ in loader:
        n += len(x)
        shape = list(x.shape)
    return n / (time.perf_counter() - t0), n, shape


# ---- ours ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def our_clips_per_second(trainer: FoldTrainer, batches: int) -> tuple[float, int, list[int]]:
    """Clips per second in batches ready for the step (on the device, augmented), over `batches`
    batches; the clips delivered and the shape of a batch."""
    bs, n = trainer.config.batch_size, len(trainer.x_train)
    sync(trainer.device)
    t0 = time.perf_counter()
    delivered = 0
    order = torch.randperm(n, generator=trainer.generator, device=trainer.device)
    for i in range(batches):
        j = (i % (n // bs)) * bs
        x, _ = trainer.batch(order[j : j + bs])
        delivered += x.shape[0]
    sync(trainer.device)
    return delivered / (time.perf_counter() - t0), delivered, list(x.shape)


def step_split(trainer: FoldTrainer, steps: int) -> dict[str, float]:
    """Median seconds per step of: data (index + augment), forward+backward, optimizer+LR."""
    bs, n, dev = trainer.config.batch_size, len(trainer.x_train), trainer.device
    order = torch.randperm(n, generator=trainer.generator, device=dev)
    trainer.model.train()
    data_t, fb_t, opt_t = [], [], []
    for i in range(steps):
        j = (i % (n // bs)) * bs
        sync(dev)
        t0 = time.perf_counter()
        x, target = trainer.batch(order[j : j + bs])
        sync(dev)
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            logits = trainer.model(x)
        loss = trainer.loss(logits, target, trainer.config.label_smoothing)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(dev)
        t2 = time.perf_counter()
        trainer.optimizer.step()
        trainer.scheduler.step()
        sync(dev)
        t3 = time.perf_counter()
        if i >= 2:  # warm-up steps excluded
            data_t.append(t1 - t0)
            fb_t.append(t2 - t1)
            opt_t.append(t3 - t2)
    d, f, o = (statistics.median(v) for v in (data_t, fb_t, opt_t))
    return {
        "data_s": d,
        "forward_backward_s": f,
        "optimizer_s": o,
        "data_fraction": d / (d + f + o),
        "outside_forward_backward_fraction": (d + o) / (d + f + o),
    }


def load_features(shards: str | None, n_fallback: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if shards:
        from trainable.shards import load_shards

        data = load_shards(shards)
        keep = data.fold != 1  # a training set: folds 2-5
        return data.x[keep], data.y[keep], f"shards {shards} (folds 2-5)"
    files, labels = esc50_files(n_fallback)
    ds = SeedDataset(files, labels, FeatureParams())  # the product's features, computed once
    x = torch.stack([ds[i][0][0] for i in range(len(ds))]).half()
    return x, torch.tensor(labels), f"{len(files)} clips computed here with LogMel (no shards)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f = ROOT / ".team" / "REAL_SHARDS.txt"
    ap.add_argument("--shards", default=f.read_text().strip() if f.exists() else None)
    ap.add_argument("--clips", type=int, default=384, help="clips the seed path decodes per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", type=Path, default=ESC50, help="an ESC-50 copy for the seed path")
    ap.add_argument("--batches", type=int, default=200, help="our batches per repeat")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key")
    ap.add_argument(
        "--seed-workers", default="0,2", help="DataLoader workers of the seed path, each measured"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="result JSON (default bench/results/data_path_<time>.json)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    info = machine()
    print(f"machine: {json.dumps(info)}")
    files, labels = esc50_files(args.clips, args.source)
    x, y, source = load_features(args.shards, args.clips)
    print(
        f"seed path: {len(files)} audio files from {args.source}; ours: {source}, {tuple(x.shape)} {x.dtype}"
    )

    overrides = {k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.set)}
    config = TrainConfig.preset(args.preset, device=args.device, **overrides)
    n_val = 8
    trainer = FoldTrainer(config, x, y, x[:n_val], y[:n_val], fold=0)
    print(f"our batches: preset {args.preset} on {trainer.device}, batch {config.batch_size}")

    seed: dict[int, list[float]] = {int(w): [] for w in args.seed_workers.split(",")}
    ours = []
    our_batches = args.batches
    delivered: dict[str, list] = {}  # what each path handed over: clips and a batch's shape
    our_clips_per_second(trainer, 10)  # warm-up
    for r in range(args.repeats):  # interleaved, so load changes hit both paths alike
        for w in seed:
            rate, n, shape = seed_clips_per_second(files, labels, w)
            seed[w].append(rate)
            delivered[f"seed_workers_{w}"] = [n, shape]
        rate, n, shape = our_clips_per_second(trainer, our_batches)
        ours.append(rate)
        delivered["ours"] = [n, shape]
        seeds = ", ".join(f"workers={w} {v[-1]:.0f} clips/s" for w, v in seed.items())
        print(f"repeat {r + 1}: seed {seeds}, ours {ours[-1]:.0f} clips/s", flush=True)
    seed_med = {w: statistics.median(v) for w, v in seed.items()}
    base_w = max(seed_med, key=seed_med.get)
    base = seed_med[base_w]
    our_med = statistics.median(ours)
    ratio = our_med / base

    split = step_split(trainer, 12)
    result = {
        "machine": info,
        "device": str(trainer.device),
        "preset": args.preset,
        "seed_clips_per_s": {str(w): v for w, v in seed_med.items()},
        "seed_baseline_workers": base_w,
        "ours_clips_per_s": our_med,
        "ratio": ratio,
        "delivered": {k: {"clips": v[0], "batch_shape": v[1]} for k, v in delivered.items()},
        "our_batches": our_batches,
        "batch_size": config.batch_size,
        "step_split": split,
        "repeats": args.repeats,
        "seed_clips": len(files),
        "source": source,
    }
    seeds = ", ".join(f"workers={w} {v:.0f} clips/s" for w, v in seed_med.items())
    print(f"seed data path (median of {args.repeats}): {seeds} -> baseline {base:.0f} clips/s")
    print(f"our data path (median of {args.repeats}): {our_med:.0f} clips/s on {trainer.device}")
    print(f"ratio: {ratio:.0f}x (goal >= 100x)")
    print(
        f"training step ({args.preset}, {trainer.device}, median): data {split['data_s'] * 1e3:.1f} ms, "
        f"forward+backward {split['forward_backward_s'] * 1e3:.1f} ms, optimizer {split['optimizer_s'] * 1e3:.1f} ms; "
        f"data {100 * split['data_fraction']:.1f}% of the step, outside forward/backward "
        f"{100 * split['outside_forward_backward_fraction']:.1f}% (goal < 5%)"
    )
    out = args.out or RESULTS / f"data_path_{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"result: {out}")


if __name__ == "__main__":
    main()

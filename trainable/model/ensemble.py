"""The promoted model: the fold models of one CV checkpoint as one ensemble, raw audio in.

    ens = FoldEnsemble.from_checkpoint("path/to/checkpoint")      # meta.json + fold_<k>.pt
    probs = ens(waves)                    # (B, params.num_samples) at params.sample_rate -> (B, C)
    out = ens.predict_clips([(mono, rate), ...], top_k=5)           # any rate, any length

How a clip is scored (`FoldEnsemble.predict_clips`, top to bottom):
  1. resample the mono waveform to the features' rate (the same torchaudio kernel `esc50 prepare`
     uses);
  2. cut it into 5 s windows: a clip up to 10% longer than 5 s is cut to its first 5 s, exactly
     as the shards were made; a shorter one is zero-padded; a longer one gets ceil(length / 5 s)
     evenly spaced windows covering it (the last one ends at the clip's end);
  3. `LogMel` (trainable/model/features.py) per window, then each fold model's eval-mode logits (the
     mean over its evaluation crops, as `FoldTrainer.predict_logits` does), softmax over the
     named classes, and the mean over fold models;
  4. the mean over the clip's windows.
A clip with no samples, or whose peak is below -80 dBFS, is *silent*: its answer is uniform
probabilities, no label, and `silent=True` (a defined answer, not a guess).

`EnsembleModel` is the MLflow pyfunc wrapper (input: a DataFrame with `waveform` + `sample_rate`
columns, or a `path` column; output: one row per clip with `label`, `probability`, `top_labels`,
`top_probabilities`, `probabilities`, `silent`, `windows`).

This module is shipped inside the promoted model (mlflow `code_paths`) together with features.py,
models.py, augment.py, serving.py (request limits, which files `path` may read) and checkpoint.py
(the checkpoint layout, shared with the Tune trainable); pyfunc_entry.py names the pyfunc (the
model is logged as code, never pickled), and
is loaded in processes that do not have this project installed: it imports only torch, torchaudio,
numpy, pandas, mlflow (and soundfile, for `path` input) and its sibling modules, relatively.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from .augment import eval_crops
from .checkpoint import read_checkpoint, write_checkpoint
from .features import FeatureParams, LogMel, fit_length, resampler
from .networks import build_model
from .serving import InputError, ServePolicy

SILENCE_PEAK = 10 ** (-80 / 20)  # -80 dBFS: below this a clip counts as silent
OVERHANG = 0.1  # up to this fraction past the clip length is cut off instead of adding a window
BATCH = 64  # windows per forward pass
CHECKPOINT_ARTIFACT = "checkpoint"


# ---- fold models ------------------------------------------------------------------------------


def model_from_state(state: Mapping[str, Any]) -> torch.nn.Module:
    """An eval-mode network rebuilt from a `FoldTrainer.state_dict()` (or its slim form)."""
    config = types.SimpleNamespace(**state["config"])
    net = build_model(config, int(state["n_mels"]))
    net.load_state_dict(state["model"])
    if getattr(config, "channels_last", False):
        net = net.to(memory_format=torch.channels_last)
    return net.eval()


def slim_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What prediction needs of a fold state: no optimizer, scheduler, RNG or history."""
    return {k: state[k] for k in ("config", "fold", "epoch", "n_mels", "n_classes", "model")}


# ---- the ensemble -----------------------------------------------------------------------------


class FoldEnsemble(torch.nn.Module):
    """Fold models averaged: (B, num_samples) waveforms -> (B, len(classes)) probabilities."""

    def __init__(
        self, params: FeatureParams, classes: Sequence[str], states: Mapping[int, Mapping[str, Any]]
    ) -> None:
        super().__init__()
        if not states:
            raise ValueError("an ensemble needs at least one fold model")
        self.params = params
        self.classes = tuple(classes)
        self.folds = tuple(sorted(int(k) for k in states))
        problems = []
        for k in self.folds:
            s = states[k]
            if int(s["n_mels"]) != params.n_mels:
                problems.append(
                    f"fold {k} was trained on {s['n_mels']} mels, the features give {params.n_mels}"
                )
            if int(s["n_classes"]) < len(self.classes):
                problems.append(f"fold {k} has {s['n_classes']} outputs for {len(self.classes)} classes")
        if problems:
            raise ValueError("checkpoint does not match its feature parameters: " + "; ".join(problems))
        self.logmel = LogMel(params)
        self.nets = torch.nn.ModuleList(model_from_state(states[k]) for k in self.folds)
        self.crop = [
            (int(states[k]["config"].get("crop_frames", 0)), int(states[k]["config"].get("eval_crops", 0)))
            for k in self.folds
        ]
        self.channels_last = [bool(states[k]["config"].get("channels_last", False)) for k in self.folds]
        self.eval()

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> FoldEnsemble:
        """A checkpoint directory in the CV layout: meta.json + fold_<k>.pt for every fold in meta."""
        meta, states = read_checkpoint(directory)
        return cls(FeatureParams.from_dict(meta["features"]), meta["classes"], states)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    # ---- log-mel in -----------------------------------------------------------------------

    @torch.inference_mode()
    def fold_logits(self, i: int, spec: torch.Tensor) -> torch.Tensor:
        """Fold model i (index into `self.folds`) on (B, M, T) dB: logits of the named classes,
        the mean over its evaluation crops (as `FoldTrainer.predict_logits`)."""
        frames, n = self.crop[i]
        logits = 0
        crops = eval_crops(spec.float(), frames, n)
        for c in crops:
            c = c.unsqueeze(1)
            if self.channels_last[i]:
                c = c.contiguous(memory_format=torch.channels_last)
            logits = logits + self.nets[i](c).float()
        return (logits / len(crops))[:, : self.n_classes]

    @torch.inference_mode()
    def probs_from_spec(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, M, T) or (B, 1, M, T) dB -> (B, C): mean over fold models of softmax probabilities."""
        if spec.dim() == 4:
            spec = spec.squeeze(1)
        total = 0
        for i in range(len(self.nets)):
            total = total + torch.softmax(self.fold_logits(i, spec), dim=1)
        return total / len(self.nets)

    # ---- waveforms in ---------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, params.num_samples) float at params.sample_rate -> (B, C) probabilities."""
        out = [self.probs_from_spec(self.logmel(waves[i : i + BATCH])) for i in range(0, len(waves), BATCH)]
        return torch.cat(out) if out else torch.empty((0, self.n_classes))

    def windows(self, wave: torch.Tensor) -> torch.Tensor:
        """A 1-D waveform at the features' rate -> (W, num_samples) windows (see module docstring)."""
        n, length = self.params.num_samples, int(wave.shape[-1])
        count = max(1, math.ceil((length - OVERHANG * n) / n))
        if count == 1:
            return fit_length(wave, n).unsqueeze(0)
        starts = [round(j * (length - n) / (count - 1)) for j in range(count)]
        return torch.stack([wave[s : s + n] for s in starts])

    @torch.inference_mode()
    def predict_clips(self, clips: Iterable[tuple[Any, int]], top_k: int = 5) -> pd.DataFrame:
        """(mono waveform, sample rate) per clip -> one row per clip (columns: see `OUTPUT_COLUMNS`).

        All windows of all clips go through the models in batches of `BATCH`.
        """
        top_k = max(1, min(int(top_k), self.n_classes))
        windows, owner, silent = [], [], []
        for j, (mono, rate) in enumerate(clips):
            wave = self._resampled(mono, rate, j)
            quiet = wave.numel() == 0 or float(wave.abs().max()) < SILENCE_PEAK
            silent.append(quiet)
            if not quiet:
                w = self.windows(wave)
                windows.append(w)
                owner += [j] * len(w)
        n_clips = len(silent)
        probs = torch.full((n_clips, self.n_classes), 1.0 / self.n_classes)
        counts = torch.zeros(n_clips, dtype=torch.int64)
        if windows:
            window_probs = self(torch.cat(windows))
            index = torch.as_tensor(owner)
            counts = torch.bincount(index, minlength=n_clips)
            sums = torch.zeros((n_clips, self.n_classes)).index_add_(0, index, window_probs)
            heard = counts > 0
            probs[heard] = sums[heard] / counts[heard].unsqueeze(1)
        return self._rows(probs, silent, counts, top_k)

    def _resampled(self, mono: Any, rate: Any, j: int) -> torch.Tensor:
        wave = torch.as_tensor(np.asarray(mono, dtype=np.float32))
        if wave.dim() != 1:
            raise InputError(f"clip {j}: waveform must be 1-D (mono), got shape {tuple(wave.shape)}")
        rate = valid_rate(j, rate)
        if not torch.isfinite(wave).all():
            raise InputError(f"clip {j}: waveform contains NaN or infinite samples")
        if rate != self.params.sample_rate and wave.numel():
            wave = resampler(rate, self.params.sample_rate)(wave)
        return wave

    def _rows(
        self, probs: torch.Tensor, silent: list[bool], counts: torch.Tensor, top_k: int
    ) -> pd.DataFrame:
        top_p, top_i = probs.topk(top_k, dim=1)
        rows = []
        for j in range(len(silent)):
            names = [self.classes[i] for i in top_i[j].tolist()]
            rows.append(
                {
                    "label": None if silent[j] else names[0],
                    "probability": float(top_p[j, 0]),
                    "top_labels": [] if silent[j] else names,
                    "top_probabilities": [] if silent[j] else top_p[j].tolist(),
                    "probabilities": probs[j].tolist(),
                    "silent": bool(silent[j]),
                    "windows": int(counts[j]),
                }
            )
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


OUTPUT_COLUMNS = [
    "label",
    "probability",
    "top_labels",
    "top_probabilities",
    "probabilities",
    "silent",
    "windows",
]

# ---- checkpoints (the layout: checkpoint.py; `read_checkpoint` comes from there) ----------------


def write_slim_checkpoint(
    directory: str | Path, meta: Mapping[str, Any], states: Mapping[int, Mapping[str, Any]]
) -> Path:
    """The same layout with only what prediction needs (what the promoted model ships)."""
    return write_checkpoint(directory, meta, {k: slim_state(s) for k, s in states.items()})


# ---- the MLflow pyfunc ------------------------------------------------------------------------


def valid_rate(j: int, given: Any) -> int:
    """A clip's sample_rate as a positive int; InputError naming the clip otherwise."""
    try:
        rate = int(given)
    except (TypeError, ValueError, OverflowError):  # None, NaN (a row without it), text
        rate = 0
    if rate <= 0 or rate != given:
        raise InputError(f"clip {j}: sample_rate must be a positive integer, got {given!r}")
    return rate


def _clips_from_input(model_input: Any, policy: ServePolicy) -> list[tuple[Any, int]]:
    """The pyfunc's input (DataFrame, dict, list of dicts) -> [(mono, rate)] in row order, each
    record checked against `policy` (count, length, rate, which files) before any audio is decoded."""
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise InputError(
            f"input must be a DataFrame or records with 'waveform' + 'sample_rate' or 'path'; got {type(model_input).__name__}"
        )
    cols = set(model_input.columns)
    if not ({"waveform", "sample_rate"} <= cols or "path" in cols):
        raise InputError(f"input needs columns 'waveform' and 'sample_rate', or 'path'; got {sorted(cols)}")
    policy.check_records(len(model_input))
    clips = []
    for j, row in enumerate(model_input.to_dict("records")):
        path, wave = row.get("path"), row.get("waveform")
        if isinstance(path, str) and path:
            clips.append(policy.read_path(j, path))
        elif wave is not None and not (isinstance(wave, float) and math.isnan(wave)):
            rate = valid_rate(j, row.get("sample_rate"))
            policy.check_rate(j, rate)
            policy.check_length(j, int(np.shape(wave)[0]) if np.ndim(wave) else 1, rate)
            clips.append((wave, rate))
        else:
            raise InputError(f"row {j}: neither a waveform nor a path")
    return clips


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around `FoldEnsemble`; its artifact `checkpoint` is a (slim) CV checkpoint.
    What a request may ask (limits, `path` records) is `policy`, read from the environment of the
    process that loads the model (trainable/model/serving.py)."""

    def load_context(self, context: Any) -> None:
        self.policy = ServePolicy.from_env()
        self.ensemble = FoldEnsemble.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    # `pd.DataFrame` is a hint mlflow does not turn into a schema: the signature checks the columns.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        top_k = int((params or {}).get("top_k", 5))
        try:
            return self.ensemble.predict_clips(_clips_from_input(model_input, self.policy), top_k=top_k)
        except InputError as e:
            # A 400 from the scoring server, not a 500 with a traceback.
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature():
    """Input: waveform (array of float) + sample_rate, or path; output columns; param top_k."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec(Array("double"), "waveform", required=False),
            ColSpec("long", "sample_rate", required=False),
            ColSpec("string", "path", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "label", required=False),
            ColSpec("double", "probability"),
            ColSpec(Array("string"), "top_labels"),
            ColSpec(Array("double"), "top_probabilities"),
            ColSpec(Array("double"), "probabilities"),
            ColSpec("boolean", "silent"),
            ColSpec("long", "windows"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("top_k", "long", 5)]))


def example_input(params: FeatureParams, seconds: float = 0.25) -> pd.DataFrame:
    """A small input example: a quarter second of a 440 Hz tone at the features' rate."""
    t = np.arange(int(params.sample_rate * seconds), dtype=np.float32) / params.sample_rate
    wave = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    return pd.DataFrame({"waveform": [wave.tolist()], "sample_rate": [int(params.sample_rate)]})

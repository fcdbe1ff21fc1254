"""Log-mel feature parameters and the one function that computes them.

Everything that turns audio into model input goes through `LogMel`: `esc50 prepare` when it
writes shards, and the promoted model when it classifies a new clip. The parameters are written
into every shard's schema metadata and packed into the promoted model, so a mismatch is caught
instead of silently degrading accuracy.

This module must import with only torch/torchaudio present: the promoted MLflow model ships it
as code, to be loaded in a process that does not have this project installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torchaudio

STORAGE_DTYPES = ("float32", "float16", "uint8")


@dataclass(frozen=True)
class FeatureParams:
    """How a clip becomes a (n_mels, n_frames) log-mel spectrogram in dB.

    The defaults are the product's: 22.05 kHz keeps everything ESC-50's sounds need below 11 kHz
    at half the decode/resample/mel cost of 44.1 kHz. The notebook's settings are
    `FeatureParams.seed()`.
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    log_floor: float = 1e-10  # power floor before 10*log10 (AmplitudeToDB's amin)
    top_db: float | None = 80.0  # dynamic range kept below each clip's peak; None keeps all
    clip_seconds: float = 5.0
    storage_dtype: str = "float16"  # how shards store the dB values; see trainable/shards.py

    def __post_init__(self) -> None:
        problems = []
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0")
        if self.hop_length > self.n_fft:
            problems.append("hop_length must be <= n_fft")
        if self.f_max is not None and not (self.f_min < self.f_max <= self.sample_rate / 2):
            problems.append(f"need f_min < f_max <= sample_rate/2 = {self.sample_rate / 2}")
        if self.log_floor <= 0:
            problems.append("log_floor must be > 0")
        if self.top_db is not None and self.top_db <= 0:
            problems.append("top_db must be > 0 or None")
        if self.clip_seconds <= 0:
            problems.append("clip_seconds must be > 0")
        if self.storage_dtype not in STORAGE_DTYPES:
            problems.append(f"storage_dtype must be one of {STORAGE_DTYPES}")
        if problems:
            raise ValueError("invalid feature parameters: " + "; ".join(problems))

    @classmethod
    def seed(cls) -> FeatureParams:
        """The notebook's features: 44.1 kHz, n_fft 1024, hop 512, 64 mels, power-to-dB."""
        return cls(sample_rate=44100, n_fft=1024, hop_length=512, n_mels=64, top_db=None)

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def num_frames(self) -> int:
        return self.num_samples // self.hop_length + 1  # centered STFT

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_mels, self.num_frames)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown feature parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> FeatureParams:
        return cls.from_dict(json.loads(s))

    def compute_key(self) -> dict[str, Any]:
        """The parameters that change the computed values (storage dtype only changes precision)."""
        d = self.to_dict()
        d.pop("storage_dtype")
        return d

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def mismatch(self, other: FeatureParams) -> list[str]:
        """Names and values of the computing parameters that differ, for error messages."""
        a, b = self.compute_key(), other.compute_key()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


class LogMel(torch.nn.Module):
    """(batch, samples) float waveform at `params.sample_rate` -> (batch, n_mels, frames) dB."""

    def __init__(self, params: FeatureParams) -> None:
        super().__init__()
        self.params = params
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=params.sample_rate,
            n_fft=params.n_fft,
            hop_length=params.hop_length,
            n_mels=params.n_mels,
            f_min=params.f_min,
            f_max=params.f_max,
            power=2.0,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=params.top_db)
        self.to_db.amin = params.log_floor

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        spec = self.mel(wave.float())
        # AmplitudeToDB applies top_db over the whole batch when given 3-D input; per clip
        # is what we want, so give each clip its own leading dimension.
        return self.to_db(spec.unsqueeze(1)).squeeze(1)


_RESAMPLERS: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


def resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    """A cached resampling kernel per (source rate, target rate): building one costs more than using it.

    Shards and the promoted model both resample through this, so a clip at any rate is seen the same way.
    """
    key = (int(orig_rate), int(new_rate))
    r = _RESAMPLERS.get(key)
    if r is None:
        r = _RESAMPLERS[key] = torchaudio.transforms.Resample(*key)
    return r


def fit_length(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Cut or zero-pad the last dimension to exactly `num_samples`."""
    n = wave.shape[-1]
    if n >= num_samples:
        return wave[..., :num_samples]
    return torch.nn.functional.pad(wave, (0, num_samples - n))

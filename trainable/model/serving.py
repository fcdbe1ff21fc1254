"""What a scoring request may ask of the promoted model: limits and the files it may read.

    policy = ServePolicy.from_env()                 # read once, when the model loads
    policy.check_records(n)                         # InputError (a 400) past the limits
    mono, rate = policy.read_path(j, "clips/dog.ogg")

Settings (environment variables of the process that loads the model, e.g. `mlflow models serve`):

    ESC50_SERVE_AUDIO_DIR    `path` records are refused unless this names a directory; a path
                             (absolute, or relative to it) is resolved, symlinks too, and must lie
                             inside it. Unset: path records are off.
    ESC50_SERVE_MAX_RECORDS  records per request (default 64)
    ESC50_SERVE_MAX_SECONDS  audio per record, in seconds (default 60)
    ESC50_SERVE_MAX_SAMPLES  audio per record, in samples (default 60 s at 48 kHz = 2,880,000),
                             whatever the sample rate claims
    ESC50_SERVE_MAX_RATE     the highest sample_rate accepted (default 192000)

A path that is missing, unreadable, outside the directory, not a regular file or not audio gets
one message (`PATH_REFUSED`), so that answers cannot tell files on the serving host apart.

Shipped inside the promoted model with ensemble.py: only the standard library, numpy, soundfile.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENV_AUDIO_DIR = "ESC50_SERVE_AUDIO_DIR"
ENV_MAX_RECORDS = "ESC50_SERVE_MAX_RECORDS"
ENV_MAX_SECONDS = "ESC50_SERVE_MAX_SECONDS"
ENV_MAX_SAMPLES = "ESC50_SERVE_MAX_SAMPLES"
ENV_MAX_RATE = "ESC50_SERVE_MAX_RATE"
DEFAULT_MAX_RECORDS = 64
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_SAMPLES = 60 * 48000
DEFAULT_MAX_RATE = 192000
PATH_REFUSED = "not a readable audio file in the server's audio directory"
PATHS_OFF = f"path records are off on this server (it was started without {ENV_AUDIO_DIR})"


class InputError(ValueError):
    """A request the model cannot score (bad column, bad sample rate, unreadable file, over a limit)."""


def _number(env: Mapping[str, str], name: str, default: float, kind: type) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(float(raw)) if kind is int else float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: must be positive")
    return value


@dataclass(frozen=True)
class ServePolicy:
    audio_dir: Path | None = None  # resolved; None: path records off
    max_records: int = DEFAULT_MAX_RECORDS
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_samples: int = DEFAULT_MAX_SAMPLES
    max_rate: int = DEFAULT_MAX_RATE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServePolicy:
        """The settings above; a bad value (or an audio directory that is not one) fails the load."""
        env = os.environ if env is None else env
        raw_dir = env.get(ENV_AUDIO_DIR, "").strip()
        audio_dir = None
        if raw_dir:
            audio_dir = Path(os.path.realpath(raw_dir))
            if not audio_dir.is_dir():
                raise ValueError(f"{ENV_AUDIO_DIR}={raw_dir!r}: not a directory")
        return cls(
            audio_dir=audio_dir,
            max_records=_number(env, ENV_MAX_RECORDS, DEFAULT_MAX_RECORDS, int),
            max_seconds=_number(env, ENV_MAX_SECONDS, DEFAULT_MAX_SECONDS, float),
            max_samples=_number(env, ENV_MAX_SAMPLES, DEFAULT_MAX_SAMPLES, int),
            max_rate=_number(env, ENV_MAX_RATE, DEFAULT_MAX_RATE, int),
        )

    @classmethod
    def unlimited(cls, audio_dir: Path | None = None) -> ServePolicy:
        """For a local caller scoring its own files (`esc50 predict`): no size limits."""
        inf = math.inf
        return cls(audio_dir=audio_dir, max_records=inf, max_seconds=inf, max_samples=inf, max_rate=inf)  # type: ignore[arg-type]

    # ---- limits --------------------------------------------------------------------------------

    def check_records(self, n: int) -> None:
        if n > self.max_records:
            raise InputError(
                f"{n} records in one request; the limit is {self.max_records} ({ENV_MAX_RECORDS})"
            )

    def check_rate(self, j: int, rate: int) -> None:
        if rate > self.max_rate:
            raise InputError(
                f"clip {j}: sample_rate {rate} is above the limit {self.max_rate} ({ENV_MAX_RATE})"
            )

    def check_length(self, j: int, samples: int, rate: int) -> None:
        """Before any decoding or resampling: a clip over either limit is refused."""
        if samples > self.max_samples:
            raise InputError(
                f"clip {j}: {samples} samples; the limit is {self.max_samples} per clip ({ENV_MAX_SAMPLES})"
            )
        if rate > 0 and samples / rate > self.max_seconds:
            raise InputError(
                f"clip {j}: {samples / rate:.1f} s of audio; the limit is {self.max_seconds:g} s per clip "
                f"({ENV_MAX_SECONDS})"
            )

    # ---- path records -----------------------------------------------------------------------------

    def read_path(self, j: int, path: str) -> tuple[np.ndarray, int]:
        """A file inside the audio directory -> (mono float32, rate); `InputError(PATH_REFUSED)` for
        every way it can fail, so the answer does not say which."""
        if self.audio_dir is None:
            raise InputError(PATHS_OFF)
        import soundfile as sf

        refused = InputError(f"row {j}: {PATH_REFUSED}")
        try:
            # realpath resolves every symlink and ".."; the file opened is the resolved one, with
            # O_NOFOLLOW so a symlink swapped in afterwards is not followed.
            real = Path(os.path.realpath(self.audio_dir / path))
            if not real.is_relative_to(self.audio_dir):
                raise refused
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (OSError, ValueError):  # missing, no permission, a NUL in the name, ...
            raise refused from None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)  # a FIFO or device would block or never end
        except OSError:
            regular = False
        if not regular:
            os.close(fd)
            raise refused
        with os.fdopen(fd, "rb") as f:
            try:
                with sf.SoundFile(f) as snd:
                    rate, frames = int(snd.samplerate), int(snd.frames)
                    self.check_rate(j, rate)
                    self.check_length(j, frames, rate)
                    data = snd.read(dtype="float32", always_2d=True)
            except InputError:
                raise
            except Exception:  # LibsndfileError, RuntimeError, OSError: not audio, or unreadable
                raise refused from None
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
        return mono, rate

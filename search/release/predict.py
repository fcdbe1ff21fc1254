"""`esc50 predict FILE...`: classify audio files with a registered model (default: the champion).

Each file is decoded by `trainable.audio.decode` (any libsndfile format, any rate, mono or stereo,
mixed to mono) and handed to the MLflow pyfunc as a waveform and its rate; the model resamples,
cuts the clip into 5 s windows and averages their probabilities (see trainable/model/ensemble.py). A
file with no samples, or a silent one, gets the model's defined answer (`silent`, no label).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import UserError
from search.release.champion import CHAMPION, DEFAULT_NAME
from search.store import client

DEFAULT_MODEL = f"models:/{DEFAULT_NAME}@{CHAMPION}"
# MLflow's loaders of a model from code (3.17 writes the first; the second reads the same layout).
CODE_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
FILES_PER_CALL = 32  # files per pyfunc call: bounds memory for long lists of long files


@dataclass(frozen=True)
class Clip:
    path: str
    wave: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.rate if self.rate else 0.0


def read_clip(path: str | Path) -> Clip:
    """Decode one file; UserError naming it when it is missing, empty or not audio."""
    import soundfile as sf

    from trainable.audio import decode

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(p))
    except Exception:  # not something libsndfile knows: decode() names the problem
        info = None
    if info is not None and info.frames == 0:  # a valid header with no samples: the model's silent answer
        return Clip(str(path), np.zeros(0, dtype=np.float32), int(info.samplerate))
    wave, rate = decode(p)
    return Clip(str(path), wave, rate)


def pickled_code(model_uri: str) -> str | None:
    """Why loading `model_uri` would unpickle Python code, or None when it would not.

    Only the MLmodel file is read (no weights, no code). A model this project promotes is a model
    from code (`model_code_path`: its source is a file in the model); one promoted before that, or
    any other pyfunc flavor, is a cloudpickled object (`python_model`) or a loader that unpickles."""
    from mlflow.models import Model

    flavor = Model.load(model_uri).flavors.get("python_function")
    if flavor is None:
        return "it has no python_function flavor"
    if flavor.get("python_model"):
        return f"it holds a pickled Python object ({flavor['python_model']})"
    if not flavor.get("model_code_path") or flavor.get("loader_module") not in CODE_LOADERS:
        return f"it is not a model from code (loader {flavor.get('loader_module')})"
    return None


def load_model(model_uri: str, tracking: str | None = None, allow_pickled: bool = False) -> Any:
    """The pyfunc at `model_uri`; UserError when the URI, model or alias does not exist, or when the
    model holds pickled code (a version promoted before models were logged as code) and
    `allow_pickled` is not set: loading it would run whatever code was pickled into it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    c = client(tracking, must_exist=model_uri.startswith(("models:/", "runs:/")))
    try:
        why = pickled_code(model_uri)
        if why and not allow_pickled:
            raise UserError(
                f"refusing to load {model_uri}: {why}, and loading it would run that code. "
                "Re-promote its trial (`esc50 promote --run <trial run id>`) to register it as a model "
                "from code, or pass --allow-pickled if you trust whoever registered it"
            )
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        hint = " (run `esc50 promote` first)" if model_uri.startswith("models:/") else ""
        raise UserError(f"cannot load model {model_uri} from {c.tracking_uri}: {e.message}{hint}") from None
    except OSError as e:
        raise UserError(f"cannot load model {model_uri}: {e}") from None
    # The request limits protect a server from its clients (trainable/model/serving.py); here the user
    # scores their own files in their own process, so a long recording is not refused.
    inner = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    policy = getattr(inner, "policy", None)
    if policy is not None and hasattr(policy, "unlimited"):
        inner.policy = type(policy).unlimited()
    return model


def predict(
    files: Sequence[str | Path],
    model_uri: str = DEFAULT_MODEL,
    tracking: str | None = None,
    top_k: int = 5,
    allow_pickled: bool = False,
) -> list[dict[str, Any]]:
    """One result dict per file: file, seconds, sample_rate, label, silent, windows, top [(label, p)]."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if not files:
        raise UserError("no files given")
    if top_k < 1:
        raise UserError("--top-k must be >= 1")
    clips = [read_clip(f) for f in files]  # every file is checked before the model loads
    model = load_model(model_uri, tracking, allow_pickled)
    results = []
    for s in range(0, len(clips), FILES_PER_CALL):
        batch = clips[s : s + FILES_PER_CALL]
        df = pd.DataFrame({"waveform": [c.wave for c in batch], "sample_rate": [c.rate for c in batch]})
        try:
            out = model.predict(df, params={"top_k": top_k})
        except MlflowException as e:
            raise UserError(f"{model_uri}: {e.message}") from None
        for clip, row in zip(batch, out.to_dict("records"), strict=True):
            results.append(
                {
                    "file": clip.path,
                    "seconds": round(clip.seconds, 3),
                    "sample_rate": clip.rate,
                    "label": row["label"],
                    "silent": bool(row["silent"]),
                    "windows": int(row["windows"]),
                    "top": [
                        {"label": lab, "probability": float(p)}
                        for lab, p in zip(row["top_labels"], row["top_probabilities"], strict=True)
                    ],
                }
            )
    return results


def format_results(results: list[dict[str, Any]], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(results, indent=1)
    lines = []
    for r in results:
        head = f"{r['file']}  ({r['seconds']:.2f} s at {r['sample_rate']} Hz, {r['windows']} window(s))"
        lines.append(head)
        if r["silent"]:
            lines.append("  silent: no sound above -80 dBFS, no class")
        width = max((len(t["label"]) for t in r["top"]), default=0)
        lines += [f"  {t['label']:<{width}}  {t['probability']:.3f}" for t in r["top"]]
    return "\n".join(lines)

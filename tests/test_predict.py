"""`esc50 predict` and the promoted pyfunc's inputs: learned classes, any rate/length/format, and
every kind of bad input answered with one clear line or a defined answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from search.cli import main
from search.errors import UserError
from search.release.predict import predict
from trainable.audio import decode

REAL_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "esc50" / "audio"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_returns_the_learned_class_of_new_clips(promoted, new_clips, capsys) -> None:
    files = [str(p) for p, _ in new_clips]
    code, out, _ = _run(capsys, *files, "--tracking-uri", promoted.uri, "--json", "--top-k", "3")
    assert code == 0
    results = json.loads(out)
    assert [r["label"] for r in results] == [c for _, c in new_clips]
    for r in results:
        assert r["windows"] == 1 and not r["silent"] and len(r["top"]) == 3
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # text output: a header per file, then top-k lines "label  probability"
    code, out, _ = _run(capsys, files[0], "--tracking-uri", promoted.uri, "--top-k", "2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and lines[0].startswith(files[0])
    assert lines[1].split()[0] == new_clips[0][1]


def test_predict_any_rate_channels_and_length(promoted, new_clips, tmp_path: Path) -> None:
    """A plain 16-bit WAV as a user would record it: 16 kHz stereo, 12 s (3 windows) or 2 s (padded)."""
    import torch
    import torchaudio

    path, category = new_clips[6]
    wave, rate = decode(path)
    at16k = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()
    long = np.tile(at16k, 3)[: 12 * 16000]
    stereo = np.stack([long, 0.5 * long], axis=1)
    sf.write(tmp_path / "long.wav", stereo, 16000, subtype="PCM_16")
    sf.write(tmp_path / "short.flac", at16k[: 2 * 16000], 16000)
    long_r, short_r = predict([tmp_path / "long.wav", tmp_path / "short.flac"], tracking=promoted.uri)
    assert (long_r["windows"], short_r["windows"]) == (3, 1)
    assert long_r["label"] == category and long_r["seconds"] == 12.0 and long_r["sample_rate"] == 16000
    assert short_r["label"] in {c for _, c in new_clips}


@pytest.mark.skipif(not REAL_AUDIO.is_dir(), reason=f"no ESC-50 copy at {REAL_AUDIO}")
def test_predict_reads_real_esc50_clips(promoted) -> None:
    files = sorted(REAL_AUDIO.iterdir())[:3]
    results = predict(files, tracking=promoted.uri, top_k=2)
    assert [r["file"] for r in results] == [str(f) for f in files]
    for r in results:
        assert (
            r["sample_rate"] == 44100
            and abs(r["seconds"] - 5.0) < 0.01
            and r["windows"] == 1
            and len(r["top"]) == 2
        )


def test_silent_and_zero_length_clips_get_the_defined_answer(promoted, tmp_path: Path, capsys) -> None:
    sf.write(tmp_path / "silence.wav", np.zeros(44100 * 5, dtype=np.float32), 44100)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 22050)
    results = predict([tmp_path / "silence.wav", tmp_path / "empty.wav"], tracking=promoted.uri, top_k=3)
    for r in results:
        assert r["silent"] and r["label"] is None and r["top"] == [] and r["windows"] == 0
    code, out, _ = _run(capsys, str(tmp_path / "silence.wav"), "--tracking-uri", promoted.uri)
    assert code == 0 and "silent: no sound above -80 dBFS" in out


def test_bad_files_and_models_are_one_clear_line(promoted, new_clips, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 20)
    (tmp_path / "zero.ogg").write_bytes(b"")
    good = str(new_clips[0][0])
    cases = [
        ([str(tmp_path / "notes.wav")], "notes.wav: cannot decode audio"),
        ([str(tmp_path / "zero.ogg")], "zero.ogg: empty file (0 bytes)"),
        ([str(tmp_path / "missing.wav")], "missing.wav: no such file"),
        ([good, "--model", "models:/esc50-cnn@nope"], "cannot load model models:/esc50-cnn@nope"),
        (
            [good, "--model", "models:/no-such-model@champion"],
            "cannot load model models:/no-such-model@champion",
        ),
        ([good, "--model", "runs:/0123456789abcdef/model"], "cannot load model runs:/0123456789abcdef/model"),
        ([good, "--top-k", "0"], "--top-k must be >= 1"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv, "--tracking-uri", promoted.uri)
        assert code == 2, argv
        last = err.strip().splitlines()[-1]
        assert last.startswith("esc50 predict: error: ") and message in last, (argv, err)
        assert "Traceback" not in err
    with pytest.raises(UserError, match="no MLflow store at"):
        predict([good], tracking=f"sqlite:///{tmp_path / 'nothing.db'}")
    from search.store import client

    client(
        f"sqlite:///{tmp_path / 'other.db'}", must_exist=False
    ).search_experiments()  # a store without models
    with pytest.raises(UserError, match="run `esc50 promote` first"):
        predict([good], tracking=f"sqlite:///{tmp_path / 'other.db'}")


def test_pyfunc_inputs_dict_records_path_and_bad_requests(promoted, new_clips, monkeypatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from trainable.model.serving import PATH_REFUSED

    path, category = new_clips[2]
    monkeypatch.setenv("ESC50_SERVE_AUDIO_DIR", str(path.parent))  # read when the model loads
    mlflow.set_tracking_uri(promoted.uri)
    model = mlflow.pyfunc.load_model("models:/esc50-cnn@champion")
    wave, rate = decode(path)
    by_dict = model.predict({"waveform": wave.tolist(), "sample_rate": rate})
    by_path = model.predict(pd.DataFrame({"path": [str(path)]}), params={"top_k": 2})
    assert by_dict["label"][0] == by_path["label"][0] == category
    assert len(by_path["top_labels"][0]) == 2 and len(by_dict["top_labels"][0]) == 4  # 4 classes < top_k 5
    np.testing.assert_allclose(by_dict["probabilities"][0], by_path["probabilities"][0], atol=1e-6)
    assert sum(by_dict["probabilities"][0]) == pytest.approx(1.0)
    bad = [
        (pd.DataFrame({"waveform": [[0.1, float("nan")]], "sample_rate": [8000]}), "NaN"),
        (
            pd.DataFrame({"waveform": [[0.1, 0.2]], "sample_rate": [0]}),
            "sample_rate must be a positive integer",
        ),
        (pd.DataFrame({"path": ["/no/such/file.wav"]}), PATH_REFUSED),
    ]
    for frame, message in bad:
        with pytest.raises(MlflowException, match=message):
            model.predict(frame)

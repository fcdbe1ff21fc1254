"""trainable/audio.py: decode, mono, resample, 5 s, batched log-mel, against direct torchaudio calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from trainable.audio import AudioError, decode, load_wave, log_mel_files
from trainable.model.features import FeatureParams, LogMel


def reference_wave(path: Path, p: FeatureParams) -> torch.Tensor:
    """The textbook computation, one clip at a time, for comparison."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    x = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), rate, p.sample_rate)
    n = p.num_samples
    return x[:n] if x.numel() >= n else torch.nn.functional.pad(x, (0, n - x.numel()))


def reference_logmel(path: Path, p: FeatureParams) -> torch.Tensor:
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=p.sample_rate,
        n_fft=p.n_fft,
        hop_length=p.hop_length,
        n_mels=p.n_mels,
        f_min=p.f_min,
        f_max=p.f_max,
        power=2.0,
    )(reference_wave(path, p))
    return torchaudio.transforms.AmplitudeToDB("power", top_db=p.top_db)(mel)  # amin 1e-10 = log_floor


def audio_files(tree: Path) -> list[Path]:
    return sorted((tree / "audio").iterdir())


def mixed_sample(tree: Path) -> list[Path]:
    """12 clips covering every format x rate x channels combination of the fixture."""
    by_kind = {}
    for p in audio_files(tree):
        i = sf.info(str(p))
        by_kind.setdefault((p.suffix, i.samplerate, i.channels), []).append(p)
    assert len(by_kind) == 12
    return [paths[0] for paths in by_kind.values()]


def test_fixture_covers_formats_rates_and_channels(esc50_tree):
    infos = [sf.info(str(p)) for p in audio_files(esc50_tree)]
    assert {p.suffix for p in audio_files(esc50_tree)} == {".wav", ".flac", ".ogg"}
    assert {i.samplerate for i in infos} == {44100, 48000}
    assert {i.channels for i in infos} == {1, 2}
    assert {round(i.duration, 3) for i in infos} != {5.0}  # lengths are slightly off 5 s


def test_decode_mixes_to_mono(esc50_tree):
    for path in audio_files(esc50_tree)[:6]:
        mono, rate = decode(path)
        data, rate2 = sf.read(str(path), dtype="float32", always_2d=True)
        assert rate == rate2 and mono.ndim == 1 and mono.dtype == np.float32
        np.testing.assert_allclose(mono, data.mean(axis=1), atol=1e-7)


def test_load_wave_matches_direct_resample(esc50_tree, tiny_params):
    for path in mixed_sample(esc50_tree):
        wave = load_wave(path, tiny_params)
        assert wave.shape == (tiny_params.num_samples,)
        torch.testing.assert_close(wave, reference_wave(path, tiny_params), atol=1e-5, rtol=0)


def test_batched_logmel_matches_direct_torchaudio(esc50_tree, tiny_params):
    paths = mixed_sample(esc50_tree)
    batch = log_mel_files(paths, tiny_params)
    assert batch.shape == (12, *tiny_params.shape) and batch.dtype == np.float32
    for row, path in zip(batch, paths, strict=True):
        np.testing.assert_allclose(row, reference_logmel(path, tiny_params).numpy(), atol=1e-3, rtol=0)


def test_seed_features_are_expressible(esc50_tree):
    seed = FeatureParams.seed()
    assert (seed.sample_rate, seed.n_fft, seed.hop_length, seed.n_mels, seed.top_db) == (
        44100,
        1024,
        512,
        64,
        None,
    )
    path = audio_files(esc50_tree)[0]
    out = LogMel(seed)(load_wave(path, seed))
    assert out.shape == (1, 64, 431)
    torch.testing.assert_close(out[0], reference_logmel(path, seed), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "content",
    [b"", b"RIFF\x00\x00\x00\x00WAVEfmt garbage", b"\x00" * 1000],
    ids=["empty", "bad-header", "zeros"],
)
def test_undecodable_file_names_the_file(tmp_path, content):
    path = tmp_path / "1-100-A-0.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="1-100-A-0.wav"):
        decode(path)

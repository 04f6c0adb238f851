"""Audio validation and normalisation, on real files encoded here with PyAV."""

from __future__ import annotations

import io
import os
import time
import wave
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from PIL import Image

from model_service.audio import AudioFacts, audio_duration, normalize_loudness, prepare_audio
from model_service.errors import (
    AudioSilent,
    AudioTooLong,
    AudioTooShort,
    AudioUnreadable,
    InvalidInput,
)

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def _signal(kind: str, rate: int, seconds: float) -> np.ndarray:
    """Mono float samples in [-1, 1]: a 440 Hz tone, speech-like noise bursts, or zeros."""
    t = np.arange(round(rate * seconds)) / rate
    if kind == "tone":
        return 0.5 * np.sin(2 * np.pi * 440 * t)
    if kind == "speech":  # noise in syllable-like bursts, about 4 a second
        noise = np.random.default_rng(0).uniform(-1, 1, t.size)
        return np.asarray(0.4 * noise * np.sin(2 * np.pi * 2 * t) ** 2)
    return np.zeros(t.size)


def _encode(
    container: str,
    codec: str,
    *,
    rate: int = 16000,
    seconds: float = 1.0,
    channels: int = 1,
    signal: str = "tone",
    options: dict[str, str] | None = None,
) -> bytes:
    """An audio file made by PyAV's own muxer and encoder."""
    layout = LAYOUTS[channels]
    pcm = (_signal(signal, rate, seconds) * 32767).astype(np.int16)
    out = io.BytesIO()
    with av.open(out, "w", format=container, options=options or {}) as muxer:
        stream = muxer.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, AudioStream)
        if codec == "vorbis":  # FFmpeg's own vorbis encoder is marked experimental
            stream.codec_context.options = {"strict": "experimental"}
        for start in range(0, pcm.size, 1024):
            chunk = np.repeat(pcm[start : start + 1024, None], channels, axis=1)  # interleave
            frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                muxer.mux(packet)
        for packet in stream.encode(None):
            muxer.mux(packet)
    return out.getvalue()


def _wav(**kwargs: Any) -> bytes:
    return _encode("wav", "pcm_s16le", **kwargs)


def _raw_wav(pcm: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit wav of exactly these samples, written without PyAV."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return out.getvalue()


def _half(data: bytes) -> bytes:
    """The first half of a file, as an interrupted upload leaves it."""
    return data[: len(data) // 2]


def _prepare(data: bytes, target: Path, max_duration_s: float = 60.0, **kw: Any) -> AudioFacts:
    return prepare_audio(data, target, field="audio", max_duration_s=max_duration_s, **kw)


_REAL_RESAMPLER = av.AudioResampler


class _CountingResampler:
    """Stands in for av.AudioResampler and counts the samples it is given."""

    samples = 0

    def __init__(self, **kwargs: Any) -> None:
        self.inner = _REAL_RESAMPLER(**kwargs)

    def resample(self, frame: AudioFrame | None) -> list[AudioFrame]:
        if frame is not None:
            type(self).samples += frame.samples
        return self.inner.resample(frame)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_CountingResampler]:
    monkeypatch.setattr(_CountingResampler, "samples", 0)
    monkeypatch.setattr(av, "AudioResampler", _CountingResampler)
    return _CountingResampler


# --- formats -----------------------------------------------------------------------

FORMATS = [
    pytest.param("wav", "pcm_s16le", 44100, "pcm_s16le", id="wav"),
    pytest.param("mp3", "libmp3lame", 44100, "mp3", id="mp3"),
    pytest.param("ipod", "aac", 44100, "aac", id="m4a"),
    pytest.param("adts", "aac", 22050, "aac", id="aac"),
    pytest.param("flac", "flac", 48000, "flac", id="flac"),
    pytest.param("ogg", "libopus", 48000, "opus", id="ogg-opus"),
    pytest.param("ogg", "vorbis", 44100, "vorbis", id="ogg-vorbis"),
    pytest.param("webm", "libopus", 48000, "opus", id="webm-opus"),
]


@pytest.mark.parametrize(("container", "codec", "rate", "source_codec"), FORMATS)
@pytest.mark.parametrize("signal", ["tone", "speech"])
def test_each_format_decodes_to_a_wav_of_the_right_length(
    tmp_path: Path, container: str, codec: str, rate: int, source_codec: str, signal: str
) -> None:
    data = _encode(container, codec, rate=rate, seconds=1.5, channels=2, signal=signal)
    target = tmp_path / "out" / "audio.wav"  # the folder is created

    facts = _prepare(data, target)

    assert facts.duration_s == pytest.approx(1.5, abs=2 * 1152 / rate)  # codec padding
    assert (facts.sample_rate, facts.channels) == (rate, 2)
    assert (facts.source_codec, facts.source_sample_rate, facts.source_channels) == (
        source_codec,
        rate,
        2,
    )
    assert -10 < facts.peak_dbfs <= 0
    with wave.open(str(target), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, rate)
        assert wav.getnframes() / rate == pytest.approx(facts.duration_s)
        assert len(wav.readframes(wav.getnframes())) == wav.getnframes() * 4
    assert audio_duration(target) == pytest.approx(facts.duration_s)
    assert os.listdir(target.parent) == ["audio.wav"]  # no temp file left behind


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(8000, 8000), (16000, 16000), (44100, 44100), (48000, 48000), (96000, 48000)],
)
def test_sample_rate_is_kept_up_to_48k(tmp_path: Path, rate: int, expected: int) -> None:
    facts = _prepare(_wav(rate=rate), tmp_path / "a.wav")

    assert (facts.sample_rate, facts.source_sample_rate) == (expected, rate)
    assert facts.duration_s == pytest.approx(1.0, abs=0.002)
    assert audio_duration(tmp_path / "a.wav") == pytest.approx(1.0, abs=0.002)


def test_max_sample_rate_is_configurable(tmp_path: Path) -> None:
    facts = _prepare(_wav(rate=44100), tmp_path / "a.wav", max_sample_rate=16000)

    assert facts.sample_rate == 16000
    assert audio_duration(tmp_path / "a.wav") == pytest.approx(1.0, abs=0.002)


def test_8k_mp3_is_kept_at_8k(tmp_path: Path) -> None:
    facts = _prepare(_encode("mp3", "libmp3lame", rate=8000), tmp_path / "a.wav")

    assert (facts.sample_rate, facts.source_codec) == (8000, "mp3")
    assert facts.duration_s == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize(
    ("container", "codec", "channels", "expected"),
    [
        ("wav", "pcm_s16le", 1, 1),
        ("wav", "pcm_s16le", 2, 2),
        ("ipod", "aac", 2, 2),
        ("wav", "pcm_s16le", 6, 2),
        ("flac", "flac", 6, 2),
        ("ipod", "aac", 6, 2),
    ],
)
def test_channels_are_kept_or_downmixed_to_stereo(
    tmp_path: Path, container: str, codec: str, channels: int, expected: int
) -> None:
    data = _encode(container, codec, rate=48000, channels=channels, signal="speech")

    facts = _prepare(data, tmp_path / "a.wav")

    assert (facts.channels, facts.source_channels) == (expected, channels)
    with wave.open(str(tmp_path / "a.wav"), "rb") as wav:
        assert wav.getnchannels() == expected
    assert facts.peak_dbfs > -20  # the downmix kept the signal


def test_a_stream_that_changes_rate_midway_is_resampled_throughout(tmp_path: Path) -> None:
    # Raw AAC frames describe themselves, so two files back to back are one stream.
    data = _encode("adts", "aac", rate=16000) + _encode("adts", "aac", rate=44100, channels=2)

    facts = _prepare(data, tmp_path / "a.wav")

    assert (facts.sample_rate, facts.channels) == (16000, 1)  # set by the start
    assert facts.duration_s == pytest.approx(2.0, abs=0.2)
    assert audio_duration(tmp_path / "a.wav") == pytest.approx(facts.duration_s)


def test_half_an_mp3_without_a_length_header_is_accepted(tmp_path: Path) -> None:
    # Without a Xing header the length is only guessed from the size: nothing to compare.
    data = _half(_encode("mp3", "libmp3lame", seconds=3.0, options={"write_xing": "0"}))

    facts = _prepare(data, tmp_path / "a.wav")

    assert facts.duration_s == pytest.approx(1.5, abs=0.1)


def test_overwrites_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "a.wav"
    target.write_bytes(b"old")

    _prepare(_wav(seconds=0.5), target)

    assert audio_duration(target) == pytest.approx(0.5, abs=0.002)


# --- duration ----------------------------------------------------------------------


def test_half_a_second_is_accepted(tmp_path: Path) -> None:
    facts = _prepare(_wav(seconds=0.5), tmp_path / "a.wav")

    assert facts.duration_s == pytest.approx(0.5, abs=0.002)


def test_a_tenth_of_a_second_is_too_short(tmp_path: Path) -> None:
    with pytest.raises(AudioTooShort) as caught:
        _prepare(_wav(seconds=0.1), tmp_path / "a.wav")

    error = caught.value
    assert (error.code, error.status_code) == ("audio_too_short", 422)
    assert error.details["field"] == "audio"
    assert error.details["duration_s"] == pytest.approx(0.1, abs=0.002)
    assert error.details["min_duration_s"] == 0.2
    assert "audio: " in error.message
    assert not (tmp_path / "a.wav").exists()


def _long_wav(minutes: int) -> bytes:
    """8 kHz mono wav: silence, with a tone in the first second."""
    pcm = np.zeros(minutes * 60 * 8000, dtype="<i2")
    pcm[:8000] = _signal("tone", 8000, 1.0) * 32767
    return _raw_wav(pcm, 8000)


def test_a_declared_duration_over_the_cap_is_refused_before_decoding(
    tmp_path: Path, counting: type[_CountingResampler]
) -> None:
    with pytest.raises(AudioTooLong) as caught:
        _prepare(_long_wav(10), tmp_path / "a.wav", max_duration_s=5)

    error = caught.value
    assert (error.code, error.status_code) == ("audio_too_long", 422)
    assert error.details == {"field": "audio", "duration_s": 600.0, "max_duration_s": 5}
    assert "600.00 s" in error.message
    assert "5 s" in error.message
    assert "MAX_AUDIO_S" in error.message
    assert counting.samples == 0
    assert os.listdir(tmp_path) == []


def test_decoding_stops_at_the_cap_when_no_duration_is_declared(
    tmp_path: Path, counting: type[_CountingResampler]
) -> None:
    # Raw AAC (ADTS) frames carry no total length; 10 minutes made by repeating 2 s.
    data = _encode("adts", "aac", rate=8000, seconds=2.0) * 300
    started = time.monotonic()

    with pytest.raises(AudioTooLong) as caught:
        _prepare(data, tmp_path / "a.wav", max_duration_s=5)

    assert time.monotonic() - started < 2.0
    assert counting.samples <= 5 * 8000  # nothing decoded past the cap was used
    assert 5 < caught.value.details["duration_s"] < 5.5
    assert "at least" in caught.value.message
    assert os.listdir(tmp_path) == []


def test_exactly_at_the_cap_is_accepted(tmp_path: Path) -> None:
    facts = _prepare(_wav(seconds=2.0), tmp_path / "a.wav", max_duration_s=2)

    assert facts.duration_s == pytest.approx(2.0)


# --- unreadable and silent -----------------------------------------------------------


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, format="PNG")
    return out.getvalue()


UNREADABLE: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "random": lambda: np.random.default_rng(1).bytes(20_000),
    "text": lambda: b"hello, this is not audio\n" * 100,
    "png": _png,
    "wav-header-only": lambda: _wav()[:44],
    "m4a-half": lambda: _half(_encode("ipod", "aac", seconds=3.0)),
    "mp3-half": lambda: _half(_encode("mp3", "libmp3lame", seconds=3.0)),
    "flac-half": lambda: _half(_encode("flac", "flac", seconds=3.0)),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_input_is_refused(tmp_path: Path, name: str) -> None:
    data = UNREADABLE[name]()

    with pytest.raises(AudioUnreadable) as caught:
        _prepare(data, tmp_path / "a.wav")

    error = caught.value
    assert isinstance(error, InvalidInput)
    assert (error.code, error.status_code) == ("audio_unreadable", 422)
    assert error.details["field"] == "audio"
    assert error.message.startswith("audio: ")
    if "half" not in name:  # a cut file is told to be sent whole instead
        assert all(fmt in error.message for fmt in ("wav", "mp3", "m4a", "flac", "ogg"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("amplitude", [0, 10])  # zeros; about -70 dBFS
def test_silence_is_refused(tmp_path: Path, amplitude: int) -> None:
    pcm = np.full(16000, amplitude)
    pcm[::2] = -amplitude
    data = _raw_wav(pcm, 16000)

    with pytest.raises(AudioSilent) as caught:
        _prepare(data, tmp_path / "a.wav")

    error = caught.value
    assert (error.code, error.status_code) == ("audio_silent", 422)
    assert "the audio is silent (peak" in error.message
    assert "nothing to lip-sync" in error.message
    assert error.details["peak_dbfs"] < -60
    assert os.listdir(tmp_path) == []


def test_silence_threshold_is_configurable(tmp_path: Path) -> None:
    data = _encode("flac", "flac", signal="tone")  # peak about -6 dBFS

    with pytest.raises(AudioSilent):
        _prepare(data, tmp_path / "a.wav", silence_dbfs=-3.0)
    assert _prepare(data, tmp_path / "a.wav", silence_dbfs=-10.0).peak_dbfs == pytest.approx(
        -6.0, abs=0.1
    )


# --- loudness for a talking-video audio encoder (InfiniteTalk's -23 LUFS) ----------------


def _loudness(path: Path) -> float:
    import pyloudnorm

    with wave.open(str(path), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, channels)
    return float(pyloudnorm.Meter(rate).integrated_loudness(pcm.mean(axis=1) / 32768))


@pytest.mark.parametrize(("scale", "channels"), [(0.02, 1), (0.9, 1), (0.05, 2)])
def test_speech_is_brought_to_minus_23_lufs(tmp_path: Path, scale: float, channels: int) -> None:
    pcm = (_signal("speech", 16000, 2.0) / 0.4 * scale * 32767).astype(np.int16)
    src = tmp_path / "speech.wav"
    with wave.open(str(src), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.repeat(pcm[:, None], channels, axis=1).tobytes())
    before = _loudness(src)
    measured = normalize_loudness(src, tmp_path / "out.wav")
    assert measured == pytest.approx(before, abs=0.01)
    assert _loudness(tmp_path / "out.wav") == pytest.approx(-23.0, abs=0.3)
    with wave.open(str(tmp_path / "out.wav"), "rb") as out:
        assert (out.getnchannels(), out.getframerate()) == (channels, 16000)
        assert out.getnframes() == len(pcm)


@pytest.mark.parametrize("case", ["silence", "too_short"])
def test_unmeasurable_speech_is_copied_as_it_is(tmp_path: Path, case: str) -> None:
    seconds = 2.0 if case == "silence" else 0.3  # the meter's gate block is 400 ms
    kind = "silence" if case == "silence" else "tone"
    src = tmp_path / "in.wav"
    src.write_bytes(_raw_wav((_signal(kind, 16000, seconds) * 32767).astype(np.int16), 16000))
    assert normalize_loudness(src, tmp_path / "out.wav") is None
    assert (tmp_path / "out.wav").read_bytes() == src.read_bytes()

"""Validation and normalisation of caller-supplied audio (talking-video services).

Any common audio file is decoded with PyAV (FFmpeg) frame by frame, downmixed to mono
or stereo, resampled to at most `max_sample_rate` and written as 16-bit PCM WAV, so the
model code reads one simple format. Memory stays bounded: PCM is written as it comes
and decoding stops as soon as the duration cap is passed. Every failure becomes an
`InvalidInput` subclass (HTTP 422) naming the field.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer

from model_service.errors import AudioSilent, AudioTooLong, AudioTooShort, AudioUnreadable

ACCEPTED_FORMATS = "wav, mp3, m4a/aac, flac, ogg (vorbis or opus) or webm"

# FFmpeg demuxers we open; the rest (playlists, images, exotic containers) are refused
# before any parsing, so input can never make FFmpeg open another file or URL.
_DEMUXERS = "wav,mp3,mov,aac,flac,ogg,matroska"
# Demuxers whose declared duration comes from the header, not a guess from the bitrate.
_EXACT_DURATION = {"wav", "mov", "flac", "ogg"}
_MAX_BAD_PACKETS = 5  # FFmpeg conceals a few corrupt packets; more means broken data
_FLOOR_DBFS = -120.0  # reported for digital silence, instead of -inf (not JSON)


@dataclass(frozen=True)
class AudioFacts:
    duration_s: float  # of the decoded audio (= the written wav)
    sample_rate: int  # of the written wav
    channels: int  # of the written wav (1 or 2)
    source_codec: str  # e.g. "mp3", "aac", "flac", "vorbis", "opus", "pcm_s16le"
    source_sample_rate: int
    source_channels: int
    peak_dbfs: float


def prepare_audio(
    data: bytes,
    target: Path,
    *,
    field: str,
    max_duration_s: float,
    min_duration_s: float = 0.2,
    silence_dbfs: float = -60.0,
    max_sample_rate: int = 48000,
) -> AudioFacts:
    """Decodes `data` (any accepted audio file) and writes it to `target` as PCM WAV.

    Raises AudioUnreadable, AudioTooLong, AudioTooShort or AudioSilent.
    """
    try:
        container = av.open(
            io.BytesIO(data),
            "r",
            container_options={"format_whitelist": _DEMUXERS},
            metadata_errors="replace",
        )
    except av.FFmpegError:
        raise _unreadable(field, "is not an audio file in a supported format") from None
    with container:
        if not container.streams.audio:
            raise _unreadable(field, "holds no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_duration(container, stream, data)
        if declared is not None and declared > max_duration_s:
            raise _too_long(field, declared, max_duration_s)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                writer = _WavWriter(tmp, max_sample_rate)
                try:
                    decoded_s = _decode(container, stream, writer, field, max_duration_s)
                    writer.flush()
                finally:
                    writer.close()
            facts = _check(writer, stream, field, decoded_s, declared, min_duration_s, silence_dbfs)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return facts


def audio_duration(path: Path) -> float:
    """Duration in seconds of a wav written by `prepare_audio` (reads the header only)."""
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


class _WavWriter:
    """Resamples decoded frames to 16-bit PCM, appends them to a wav and tracks the peak.

    The output rate and channel count are fixed by the first frame.
    """

    def __init__(self, file: io.BufferedWriter, max_sample_rate: int) -> None:
        self.file = file
        self.max_sample_rate = max_sample_rate
        self.wav: wave.Wave_write | None = None
        self.resampler: av.AudioResampler | None = None
        self.source: tuple[str, str, int] | None = None  # input format, layout, rate
        self.source_rate = 0
        self.source_channels = 0
        self.rate = 0
        self.channels = 0
        self.samples = 0  # written, per channel
        self.peak = 0  # largest absolute sample value

    def write(self, frame: AudioFrame) -> None:
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self.wav is None:
            self.source_rate = frame.sample_rate
            self.source_channels = frame.layout.nb_channels
            self.rate = min(frame.sample_rate, self.max_sample_rate)
            self.channels = 1 if self.source_channels == 1 else 2
            self.wav = wave.open(self.file, "wb")  # noqa: SIM115 - closed in close()
            self.wav.setnchannels(self.channels)
            self.wav.setsampwidth(2)
            self.wav.setframerate(self.rate)
        if source != self.source:  # first frame, or the stream changed format midway
            self.flush()
            layout = "mono" if self.channels == 1 else "stereo"
            self.resampler = av.AudioResampler(format="s16", layout=layout, rate=self.rate)
            self.source = source
        assert self.resampler is not None
        self._append(self.resampler.resample(frame))

    def flush(self) -> None:
        """Writes what the resampler still holds."""
        if self.resampler is not None:
            self._append(self.resampler.resample(None))

    def close(self) -> None:
        if self.wav is not None:
            self.wav.close()  # writes the final lengths into the header

    def _append(self, frames: list[AudioFrame]) -> None:
        assert self.wav is not None
        for frame in frames:
            pcm = frame.to_ndarray().astype("<i2", copy=False)  # packed: (1, samples * ch)
            if pcm.size:
                self.peak = max(self.peak, int(pcm.max()), -int(pcm.min()))
                self.wav.writeframesraw(pcm.tobytes())
                self.samples += frame.samples


def _decode(
    container: InputContainer,
    stream: AudioStream,
    writer: _WavWriter,
    field: str,
    max_duration_s: float,
) -> float:
    """Decodes the stream into `writer`; returns the decoded seconds."""
    decoded = Fraction(0)  # seconds, exact: a file right at the cap passes
    bad_packets = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad_packets += 1
                if bad_packets > _MAX_BAD_PACKETS:
                    raise
                continue
            for frame in frames:
                decoded += Fraction(frame.samples, frame.sample_rate)
                if decoded > max_duration_s:  # stop now: do not decode a long file fully
                    raise _too_long(field, float(decoded), max_duration_s, at_least=True)
                writer.write(frame)
    except av.FFmpegError:
        raise _unreadable(field, "is corrupt") from None
    return float(decoded)


def _check(
    writer: _WavWriter,
    stream: AudioStream,
    field: str,
    decoded_s: float,
    declared: float | None,
    min_duration_s: float,
    silence_dbfs: float,
) -> AudioFacts:
    """Judges the written audio; returns its facts."""
    if writer.samples == 0:
        raise _unreadable(field, "holds no audio samples")
    duration_s = writer.samples / writer.rate
    # A file cut short (an interrupted upload) or with damaged parts still decodes, but
    # its header tells how long it should be.
    if declared is not None and decoded_s < 0.9 * declared - 0.1:
        raise AudioUnreadable(
            f"{field}: the audio file is truncated or damaged: it declares {declared:.2f} s "
            f"but only {decoded_s:.2f} s can be decoded; send the complete file",
            field=field,
            duration_s=round(decoded_s, 3),
            declared_duration_s=round(declared, 3),
        )
    if duration_s < min_duration_s:
        raise AudioTooShort(
            f"{field}: the audio is {duration_s:.2f} s long, shorter than the minimum of "
            f"{min_duration_s:g} s; send a longer recording",
            field=field,
            duration_s=round(duration_s, 3),
            min_duration_s=min_duration_s,
        )
    peak = writer.peak / 32768
    peak_dbfs = round(20 * math.log10(peak), 1) if peak > 0 else _FLOOR_DBFS
    if peak_dbfs < silence_dbfs:
        raise AudioSilent(
            f"{field}: the audio is silent (peak {peak_dbfs:.1f} dBFS): nothing to lip-sync; "
            "send a recording with speech",
            field=field,
            peak_dbfs=peak_dbfs,
            silence_dbfs=silence_dbfs,
        )
    return AudioFacts(
        duration_s=duration_s,
        sample_rate=writer.rate,
        channels=writer.channels,
        source_codec=stream.codec_context.codec.canonical_name,
        source_sample_rate=writer.source_rate,
        source_channels=writer.source_channels,
        peak_dbfs=peak_dbfs,
    )


def _unreadable(field: str, why: str) -> AudioUnreadable:
    return AudioUnreadable(
        f"{field}: the audio cannot be decoded: the file {why}; send a {ACCEPTED_FORMATS} file",
        field=field,
    )


def _too_long(
    field: str, duration_s: float, max_duration_s: float, *, at_least: bool = False
) -> AudioTooLong:
    length = f"at least {duration_s:.2f} s" if at_least else f"{duration_s:.2f} s"
    return AudioTooLong(
        f"{field}: the audio is {length} long, more than the limit of "
        f"{max_duration_s:g} s; trim it or raise MAX_AUDIO_S",
        field=field,
        duration_s=round(duration_s, 3),
        max_duration_s=max_duration_s,
    )


def _declared_duration(container: InputContainer, stream: AudioStream, data: bytes) -> float | None:
    """The stream's duration as its header declares it; None where FFmpeg would only
    guess it from the bitrate (raw AAC, mp3 without a Xing/Info/VBRI header, webm)."""
    demuxer = container.format.name.split(",")[0]
    if demuxer not in _EXACT_DURATION and not (demuxer == "mp3" and _has_mp3_length(data)):
        return None
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _has_mp3_length(data: bytes) -> bool:
    """Whether the mp3 starts with a Xing, Info or VBRI frame that counts its frames."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # skip an ID3v2 tag: syncsafe size
        size = sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(data[6:10]))
        start = 10 + size + (10 if data[5] & 0x10 else 0)
    head = data[start : start + 64]  # the tag sits at byte 13..36 of that frame
    if head[:1] != b"\xff":
        return False
    for tag in (b"Xing", b"Info"):  # tag, flags (bit 0: frame count present), count
        at = head.find(tag)
        if at > 0 and len(head) >= at + 12 and head[at + 7] & 1:
            return head[at + 8 : at + 12] != b"\0\0\0\0"
    at = head.find(b"VBRI")  # tag, version, delay, quality, bytes, count
    return at > 0 and len(head) >= at + 18 and head[at + 14 : at + 18] != b"\0\0\0\0"


# InfiniteTalk's authors bring the speech to -23 LUFS before wav2vec2
# (MeiGen-AI/InfiniteTalk `loudness_norm`, pyloudnorm): the audio features, and so the
# lip motion, then do not depend on how loud the recording is.
TARGET_LUFS = -23.0


def normalize_loudness(src: Path, dst: Path, target_lufs: float = TARGET_LUFS) -> float | None:
    """Write the wav `src` (16-bit PCM, as `prepare_audio` writes it) to `dst` at
    `target_lufs` integrated loudness (ITU-R BS.1770, measured by pyloudnorm on the mono
    mix, as the authors measure their mono 16 kHz speech; one gain for every channel).
    Returns the loudness measured before, or None with `dst` an exact copy when it cannot
    be measured (shorter than the meter's 400 ms block, or below -100 LUFS: the authors'
    rule). Samples the gain would push past full scale are clipped."""
    import numpy as np
    import pyloudnorm  # with scipy: imported where used, never by the API at start

    with wave.open(str(src), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).astype(np.float64) / 32768
    loudness: float | None = None
    if len(samples) >= int(0.4 * rate):
        measured = float(pyloudnorm.Meter(rate).integrated_loudness(samples.mean(axis=1)))
        loudness = measured if math.isfinite(measured) and abs(measured) <= 100 else None
    if loudness is None:
        dst.write_bytes(src.read_bytes())
        return None
    gain = 10 ** ((target_lufs - loudness) / 20)
    scaled = np.clip(np.round(samples * gain * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(dst), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(scaled.tobytes())
    return loudness

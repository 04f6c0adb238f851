"""Stitching of generated video segments into one file (long videos).

Three kinds of join:

* chain (`stitch_chain`): segment k+1 was generated from the last frame of segment k, so
  every join holds one duplicated boundary frame. With `drop_boundary=True` the first
  frame of every segment after the first is dropped (output: sum(frames) - (N-1) frames),
  and so is that frame's audio span, the first 1/fps s of that segment's audio.
* travel (`stitch_travel`): the last `overlap` frames of leg k and the first `overlap`
  of leg k+1 show the same moment. They are cross-faded: frame j of the overlap is
  (1-w)·a_j + w·b_j with w = (j+1)/(overlap+1), computed on the yuv420p planes (a linear
  blend there equals one in RGB). Output: sum(frames) - overlap·(N-1) frames. The audio
  under the overlap is cross-faded the same way, sample by sample: the g-th of the M
  samples under it gets w = (g+1)/(M+1).
* pieces (`stitch_pieces`): chosen frames of each video, in order (a join's clips and
  the inner frames of the bridges between them; a redo's video around its new stretch).

Re-encoded audio keeps sync exactly: output frame n owns the samples [S(n), S(n+1)) with
S(n) = round(n·rate/fps), taken from the segment(s) that frame comes from, at the same
place in them. So each segment's audio is cut, or padded with silence, to its video's
duration (AAC decodes to up to one packet more than was encoded) and no drift builds up
over the joins. A segment without audio gives silence when another one has audio. The
output audio is AAC at the rate and layout of the first segment that has audio.

Two ways to write the output, chosen per call (`StitchResult.method`):

* "copy": no frame to drop or blend (`drop_boundary=False`, `overlap=0`, or one segment)
  and every segment has the same codec parameters (codec, size, pixel format, time base,
  fps, codec extradata such as h264 SPS/PPS; the same for audio): packets are remuxed
  from the inputs opened for the checks, their timestamps moved by the duration of the
  segments before (frames/fps, for audio too). Audio packets that start before their
  segment's first frame (AAC encoder priming; kept in the first segment, where the
  muxer's edit list hides it) or at/after its last frame's end are left out, so each
  segment's audio sits under its own video. AAC frames overlap their neighbours, so the
  first packet (~21-64 ms) after a join can sound slightly off; re-encode for exact audio.
* "reencode": decoded and encoded frame by frame (libx264, yuv420p, `crf`, `preset`; AAC);
  memory stays bounded: at most `overlap` decoded frames are held, besides the codecs'
  own lookahead and one decoded audio packet per open segment.

Per-segment frame transforms (`transforms=`, e.g. a colour correction): `transforms[k]`,
if not None, gets every kept frame of segment k as an H x W x 3 RGB24 array with its
index among all of that segment's decoded frames (from 0; a dropped boundary frame is
counted but not transformed) and returns the new one, before any cross-fade. Any transform
forces "reencode". Segments without one are not converted to RGB.

Bad inputs raise `ValueError` (the job layer maps it to its failure type): no segments,
a file that is unreadable, holds no video or decodes to fewer frames than its header
says, mismatched sizes or frame rates, a leg with fewer than `overlap` frames per
neighbour, a crf outside 0..51, an unknown x264 preset, an output that is not .mp4, .m4v
or .mov, `transforms` not one per segment, a transform returning another shape or dtype.
Other FFmpeg failures propagate as `av.FFmpegError`. The output is written to a temporary
file beside `out` and moved into place with `os.replace`, so `out` is never half written.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Protocol

import av
import numpy as np
import numpy.typing as npt
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.video.frame import PictureType, VideoFrame
from av.video.stream import VideoStream

Method = Literal["copy", "reencode"]
Samples = npt.NDArray[np.float32]  # (channels, samples), planar float
# (RGB24 frame, H x W x 3; its index in the segment) -> the new frame, same shape
FrameTransform = Callable[[npt.NDArray[np.uint8], int], npt.NDArray[np.uint8]]
# a frame's index in its video -> whether it goes into the output
FrameFilter = Callable[[int], bool]

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
_MUXER_OPTIONS = {"movflags": "+faststart"}  # index first: playable while downloading
_DEMUXERS = "mov,matroska"  # inputs are mp4/mov (or mkv/webm); nothing else is opened
_DEFAULT_AUDIO_BIT_RATE = 128_000


@dataclass(frozen=True)
class AudioFacts:
    codec: str  # e.g. "aac"
    sample_rate: int
    channels: int
    layout: str  # e.g. "mono", "stereo"
    bit_rate: int | None
    duration_s: float | None  # as declared by the container
    extradata: bytes = field(default=b"", repr=False)

    def copy_key(self) -> tuple[object, ...]:
        return (self.codec, self.sample_rate, self.channels, self.layout, self.extradata)


@dataclass(frozen=True)
class VideoFacts:
    path: Path
    frames: int
    fps: Fraction  # exact, e.g. 16 or 30000/1001
    width: int
    height: int
    codec: str  # e.g. "h264"
    pix_fmt: str  # e.g. "yuv420p"
    time_base: Fraction
    audio: AudioFacts | None  # the first audio stream, if any
    extradata: bytes = field(default=b"", repr=False)  # e.g. h264 SPS/PPS

    @property
    def duration_s(self) -> float:
        """Of the video: frames / fps."""
        return float(self.frames / self.fps)

    def copy_key(self) -> tuple[object, ...]:
        """Equal keys: the packets can be concatenated without re-encoding."""
        audio = self.audio.copy_key() if self.audio else None
        video = (self.codec, self.width, self.height, self.pix_fmt, self.time_base)
        return (*video, self.fps, self.extradata, audio)


@dataclass(frozen=True)
class StitchResult:
    path: Path
    frames: int
    fps: float
    duration_s: float  # frames / fps
    method: Method
    has_audio: bool
    seconds: float  # wall time of the stitch


# --- public API ----------------------------------------------------------------------


def probe(path: Path) -> VideoFacts:
    """Facts about a video file, from its header (packets are counted if it has no count)."""
    with ExitStack() as stack:
        return _inspect(Path(path), stack)[0]


def stitch_chain(
    segments: Sequence[Path],
    out: Path,
    *,
    drop_boundary: bool = True,
    crf: int = 18,
    preset: str = "medium",
    transforms: Sequence[FrameTransform | None] | None = None,
) -> StitchResult:
    """Joins a chain of segments, each generated from the last frame of the one before.

    With `drop_boundary`, the first frame of every segment after the first (a repeat of
    the frame before it) is dropped, with its audio span.

    `transforms`: one per segment (None: the frames as decoded), called as
    `transforms[k](rgb, i)` on frame i of segment k (see the module docstring). Any
    transform forces the "reencode" method.
    """
    return _stitch(segments, "segment", Path(out), drop_boundary, 0, crf, preset, transforms)


def stitch_travel(
    legs: Sequence[Path],
    out: Path,
    *,
    overlap: int,
    crf: int = 18,
    preset: str = "medium",
    transforms: Sequence[FrameTransform | None] | None = None,
) -> StitchResult:
    """Joins legs whose last/first `overlap` frames show the same moment, cross-fading
    them (video and audio) linearly over the overlap.

    `transforms`: one per leg (None: the frames as decoded), called as
    `transforms[k](rgb, i)` on frame i of leg k before the cross-fade (see the module
    docstring). Any transform forces the "reencode" method.
    """
    return _stitch(legs, "leg", Path(out), False, overlap, crf, preset, transforms)


def stitch_pieces(
    pieces: Sequence[tuple[Path, FrameFilter | None]],
    out: Path,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> StitchResult:
    """Joins pieces of videos: frame i of piece k goes into the output when
    `pieces[k][1](i)` is true (None: every frame). A dropped frame's audio span goes with
    it; a piece without audio gives silence when another has audio. A piece may name a
    file another piece names (a redo: the video before and after its stretch). Any
    filter forces the "reencode" method."""
    paths = [Path(path) for path, _ in pieces]
    keep = [wanted for _, wanted in pieces]
    return _stitch(paths, "piece", Path(out), False, 0, crf, preset, None, keep)


def replace_audio(video: Path, audio_from: Path, out: Path) -> bool:
    """`video`'s video stream with `audio_from`'s first audio stream, both copied as they
    are (no re-encode; for two files of the same duration, e.g. a redo beside its
    original). False, and nothing written, when `audio_from` has no audio."""
    with _open(Path(audio_from)) as sound_source:
        if not sound_source.streams.audio:
            return False
        with (
            _open(Path(video)) as picture_source,
            _atomic(Path(out)) as tmp,
            av.open(str(tmp), "w", format=_muxer(Path(out)), options=_MUXER_OPTIONS) as output,
        ):
            picture = picture_source.streams.video[0]
            sound = sound_source.streams.audio[0]
            streams = {
                picture: output.add_stream_from_template(picture),
                sound: output.add_stream_from_template(sound),
            }
            for source, stream in ((picture_source, picture), (sound_source, sound)):
                for packet in source.demux(stream):
                    if packet.dts is None:
                        continue  # the demuxer's empty flush packets
                    packet.stream = streams[stream]
                    output.mux(packet)
    return True


# --- checks --------------------------------------------------------------------------


def _open(path: Path) -> InputContainer:
    return av.open(str(path), "r", container_options={"format_whitelist": _DEMUXERS})


def _inspect(path: Path, stack: ExitStack) -> tuple[VideoFacts, InputContainer]:
    """Opens `path` (closed with `stack`), its packets still unread, and its facts."""
    try:
        container = stack.enter_context(_open(path))
        return _facts(path, container), container
    except av.FFmpegError as exc:
        raise ValueError(f"{path}: not a readable video file ({exc})") from None


def _facts(path: Path, container: InputContainer) -> VideoFacts:
    if not container.streams.video:
        raise ValueError(f"{path}: holds no video stream")
    video = container.streams.video[0]
    fps = video.average_rate or video.guessed_rate
    if not fps or video.time_base is None:
        raise ValueError(f"{path}: the video's frame rate is unknown")
    audio = None
    if container.streams.audio:
        sound = container.streams.audio[0]
        declared = sound.duration * sound.time_base if sound.duration and sound.time_base else None
        audio = AudioFacts(
            codec=sound.codec_context.name,
            sample_rate=sound.sample_rate,
            channels=sound.channels,
            layout=sound.layout.name,
            bit_rate=sound.bit_rate or None,
            duration_s=float(declared) if declared is not None else None,
            extradata=bytes(sound.codec_context.extradata or b""),
        )
    frames = video.frames or _count_packets(path)
    if frames == 0:
        raise ValueError(f"{path}: the video has no frames")
    return VideoFacts(
        path=path,
        frames=frames,
        fps=Fraction(fps),
        width=video.width,
        height=video.height,
        codec=video.codec_context.name,
        pix_fmt=video.codec_context.pix_fmt or "unknown",
        time_base=Fraction(video.time_base),
        audio=audio,
        extradata=bytes(video.codec_context.extradata or b""),
    )


def _count_packets(path: Path) -> int:
    """Video packets (= frames), for containers whose header has no count (mkv)."""
    with _open(path) as container:
        return sum(1 for p in container.demux(video=0) if p.dts is not None)


def _inspect_all(
    paths: Sequence[Path], noun: str, stack: ExitStack
) -> list[tuple[VideoFacts, InputContainer]]:
    """Opens and checks every input: they must share size and frame rate."""
    if not paths:
        raise ValueError(f"no {noun}s to stitch: give at least one")
    inputs = [_inspect(Path(p), stack) for p in paths]
    first = inputs[0][0]
    for i, (f, _) in enumerate(inputs[1:], start=1):
        if (f.width, f.height) != (first.width, first.height):
            raise ValueError(
                f"{noun} {i} ({f.path.name}) is {f.width}x{f.height} but {noun} 0 "
                f"({first.path.name}) is {first.width}x{first.height}; all must be the same size"
            )
        if f.fps != first.fps:
            raise ValueError(
                f"{noun} {i} ({f.path.name}) runs at {f.fps} fps but {noun} 0 "
                f"({first.path.name}) at {first.fps} fps; all must have the same frame rate"
            )
    return inputs


def _check_encoding(crf: int, preset: str) -> None:
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be within 0..51 (lower is better quality), not {crf}")
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}, not {preset!r}")


def _check_overlap(facts: Sequence[VideoFacts], overlap: int) -> None:
    """Each leg needs `overlap` frames per neighbour: a frame fades into one leg only."""
    if overlap < 0:
        raise ValueError(f"overlap must be 0 or more frames, not {overlap}")
    last = len(facts) - 1
    for k, f in enumerate(facts):
        need = overlap * ((k > 0) + (k < last))
        if f.frames < need:
            raise ValueError(
                f"leg {k} ({f.path.name}) has {f.frames} frames but overlap={overlap} with "
                f"{'each of its neighbours' if 0 < k < last else 'its neighbour'} needs {need}"
            )


def _muxer(out: Path) -> str:
    try:
        return _MUXERS[out.suffix.lower()]
    except KeyError:
        raise ValueError(f"{out}: write to a {', '.join(_MUXERS)} file") from None


# --- the two paths -------------------------------------------------------------------


def _stitch(
    paths: Sequence[Path],
    noun: str,
    out: Path,
    drop_boundary: bool,
    overlap: int,
    crf: int,
    preset: str,
    transforms: Sequence[FrameTransform | None] | None,
    keep: Sequence[FrameFilter | None] | None = None,
) -> StitchResult:
    started = time.perf_counter()
    muxer = _muxer(out)
    _check_encoding(crf, preset)
    if transforms is not None and len(transforms) != len(paths):
        raise ValueError(
            f"got {len(transforms)} transforms for {len(paths)} {noun}s: give one per {noun} "
            "(None for no transform)"
        )
    steps = list(transforms or [None] * len(paths))
    filters = list(keep or [None] * len(paths))
    with ExitStack() as stack:  # the copy path reads the inputs opened for the checks
        inputs = _inspect_all(paths, noun, stack)
        facts = [f for f, _ in inputs]
        _check_overlap(facts, overlap)
        skip = 1 if drop_boundary and len(facts) > 1 else 0
        overlap = overlap if len(facts) > 1 else 0
        same = all(f.copy_key() == facts[0].copy_key() for f in facts)
        plain = all(step is None for step in steps) and all(w is None for w in filters)
        method: Method = "copy" if same and plain and skip == 0 and overlap == 0 else "reencode"
        if method == "copy":
            with _atomic(out) as tmp:
                frames, has_audio = _copy(inputs, tmp, muxer)
    if method == "reencode":
        with _atomic(out) as tmp:
            frames, has_audio = _reencode(
                facts, steps, tmp, muxer, skip, overlap, crf, preset, filters
            )
    fps = facts[0].fps
    return StitchResult(
        path=out,
        frames=frames,
        fps=float(fps),
        duration_s=float(frames / fps),
        method=method,
        has_audio=has_audio,
        seconds=time.perf_counter() - started,
    )


@contextmanager
def _atomic(out: Path) -> Iterator[Path]:
    """A temporary path beside `out`, moved onto `out` if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.part")  # mode as umask says
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy(
    inputs: list[tuple[VideoFacts, InputContainer]], tmp: Path, muxer: str
) -> tuple[int, bool]:
    """Remuxes every segment's packets, shifted by the segments before; no re-encode."""
    frames = 0
    offset = Fraction(0)  # seconds of video written so far
    last_audio_dts: int | None = None
    with av.open(str(tmp), "w", format=muxer, options=_MUXER_OPTIONS) as output:
        video = inputs[0][1].streams.video[0]
        audio = inputs[0][1].streams.audio[0] if inputs[0][0].audio else None
        out_video = output.add_stream_from_template(video)
        out_audio = output.add_stream_from_template(audio) if audio else None
        for k, (f, source) in enumerate(inputs):
            video = source.streams.video[0]
            start = Fraction(video.start_time or 0) * f.time_base  # seconds
            length = f.frames / f.fps
            video_shift = round((offset - start) / f.time_base)  # in time base units
            streams: list[VideoStream | AudioStream] = [video]
            audio_shift = audio_from = audio_until = 0
            if out_audio is not None:
                audio = source.streams.audio[0]
                streams.append(audio)
                audio_base = Fraction(audio.time_base or 1)
                audio_shift = round((offset - start) / audio_base)
                # audio belongs to this segment from its first frame (or before, in the
                # first: the muxer's edit list hides encoder priming) to its last's end
                audio_from = math.ceil(start / audio_base) if k else -(2**62)
                audio_until = math.ceil((start + length) / audio_base)
            for packet in source.demux(streams):
                if packet.dts is None or packet.pts is None:
                    continue  # the demuxer's empty flush packets
                if packet.stream.type == "video":
                    packet.stream = out_video
                    shift = video_shift
                    frames += 1
                else:
                    if not audio_from <= packet.pts < audio_until:
                        continue  # encoder priming, or past its video
                    shift = audio_shift
                    if last_audio_dts is not None and packet.dts + shift <= last_audio_dts:
                        continue  # would overlap the audio written before
                    last_audio_dts = packet.dts + shift
                    assert out_audio is not None
                    packet.stream = out_audio
                packet.pts += shift
                packet.dts += shift
                output.mux(packet)
            offset += length
    return frames, out_audio is not None


def _reencode(
    facts: list[VideoFacts],
    transforms: Sequence[FrameTransform | None],
    tmp: Path,
    muxer: str,
    skip: int,
    overlap: int,
    crf: int,
    preset: str,
    keep: Sequence[FrameFilter | None],
) -> tuple[int, bool]:
    """Decodes every segment frame by frame; drops the first `skip` frames of each after
    the first, and those `keep[k]` refuses; transforms the others (`transforms[k]`, if not
    None); cross-fades the last `overlap` of each with the first of the next."""
    spec = _audio_spec(facts)
    last = len(facts) - 1
    tail: deque[VideoFrame] = deque()  # the last `overlap` frames of the previous segment
    previous: _Sound | None = None  # the previous segment's audio, for the fade
    sound: _Sound | None = None
    with _Encoder(tmp, muxer, facts[0], spec, crf, preset) as encoder:
        try:
            for k, f in enumerate(facts):
                head = skip if k > 0 else 0
                fade_in = overlap if k > 0 else 0
                fade_out = overlap if k < last else 0
                sound = _open_sound(f, spec)
                fade_start = encoder.frames  # output index of this segment's first fade frame
                decoded = 0
                transform = transforms[k]
                wanted = keep[k]
                with closing(_decode(f.path)) as frames:
                    for i, frame in enumerate(frames):
                        decoded += 1
                        dropped = i < head or (wanted is not None and not wanted(i))
                        if transform is not None and not dropped:
                            frame = _transform(frame, transform, i)
                        if dropped:
                            sound.read(_span(i, spec, f.fps))
                        elif i < head + fade_in:
                            assert previous is not None
                            w = (i - head + 1) / (overlap + 1)
                            audio = _fade(encoder, previous, sound, fade_start, overlap)
                            encoder.write(_blend(tail.popleft(), frame, w), audio)
                        else:
                            tail.append(frame)
                            if len(tail) > fade_out:
                                encoder.write(tail.popleft(), sound.read(encoder.samples_next()))
                if decoded != f.frames:
                    raise ValueError(
                        f"{f.path}: decoded {decoded} frames but its header says {f.frames}; "
                        "the file is damaged"
                    )
                if previous is not None:
                    previous.close()
                previous = sound
        finally:
            for opened in (previous, sound):
                if opened is not None:
                    opened.close()
        return encoder.finish(), spec is not None


def _fade(encoder: _Encoder, a: _Sound, b: _Sound, fade_start: int, overlap: int) -> Samples | None:
    """The audio of the next output frame: `a` fading into `b`, sample by sample, over
    the span of the `overlap` frames that begin at output frame `fade_start`."""
    count = encoder.samples_next()
    if encoder.audio is None:
        return None
    first, end = encoder.sample(fade_start), encoder.sample(fade_start + overlap)
    here = encoder.sample(encoder.frames)
    w = (np.arange(here, here + count, dtype=np.float32) - first + 1) / (end - first + 1)
    return (a.read(count) * (1 - w) + b.read(count) * w).astype(np.float32)


def _span(i: int, spec: _AudioSpec | None, fps: Fraction) -> int:
    """Samples of audio under frame `i` of a segment."""
    if spec is None:
        return 0
    return round((i + 1) * spec.rate / fps) - round(i * spec.rate / fps)


def _decode(path: Path) -> Generator[VideoFrame, None, None]:
    """The video's frames in order, as yuv420p."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame if frame.format.name == "yuv420p" else frame.reformat(format="yuv420p")


def _transform(frame: VideoFrame, transform: FrameTransform, i: int) -> VideoFrame:
    """`transform` applied to `frame` in RGB24; back as yuv420p with the same colour
    matrix and range (the encoder sets pts)."""
    rgb = frame.to_ndarray(format="rgb24").astype(np.uint8, copy=False)
    new = transform(rgb, i)
    if new.dtype != np.uint8 or new.shape != rgb.shape:
        raise ValueError(f"a transform returned {new.dtype} {new.shape}, not uint8 {rgb.shape}")
    out = VideoFrame.from_ndarray(np.ascontiguousarray(new), format="rgb24")
    return out.reformat(
        format="yuv420p", dst_colorspace=frame.colorspace, dst_color_range=frame.color_range
    )


def _blend(a: VideoFrame, b: VideoFrame, w: float) -> VideoFrame:
    """(1-w)·a + w·b on the yuv420p planes."""
    x = a.to_ndarray().astype(np.float32)
    y = b.to_ndarray().astype(np.float32)
    mixed = np.rint(x * (1 - w) + y * w).astype(np.uint8)
    return VideoFrame.from_ndarray(mixed, format="yuv420p")


# --- audio ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _AudioSpec:
    """The output audio: AAC at this rate and layout."""

    rate: int
    layout: str
    channels: int
    bit_rate: int


def _audio_spec(facts: Sequence[VideoFacts]) -> _AudioSpec | None:
    first = next((f.audio for f in facts if f.audio is not None), None)
    if first is None:
        return None
    bit_rate = first.bit_rate or _DEFAULT_AUDIO_BIT_RATE
    return _AudioSpec(first.sample_rate, first.layout, first.channels, bit_rate)


class _Sound(Protocol):
    def read(self, count: int) -> Samples: ...
    def close(self) -> None: ...


def _open_sound(f: VideoFacts, spec: _AudioSpec | None) -> _Sound:
    if spec is None or f.audio is None:
        return _Silence(spec.channels if spec else 1)
    return _AudioReader(f.path, spec)


class _Silence:
    def __init__(self, channels: int) -> None:
        self.channels = channels

    def read(self, count: int) -> Samples:
        return np.zeros((self.channels, count), dtype=np.float32)

    def close(self) -> None:
        pass


class _AudioReader:
    """A segment's audio, resampled to the output's format and read by sample count.

    Sample 0 is at the segment's first video frame; reads past the end give silence.
    """

    def __init__(self, path: Path, spec: _AudioSpec) -> None:
        self.spec = spec
        self.container = _open(path)
        video = self.container.streams.video[0]
        self.start = float(Fraction(video.start_time or 0) * (video.time_base or 0))
        self.frames = self.container.decode(self.container.streams.audio[0])
        self.resampler = av.AudioResampler(format="fltp", layout=spec.layout, rate=spec.rate)
        self.pending: deque[Samples] = deque()
        self.buffered = 0
        self.aligned = False  # the first decoded frame's offset is applied
        self.drop = 0  # samples still to cut off the start
        self.done = False

    def read(self, count: int) -> Samples:
        while self.buffered < count and not self.done:
            self._pull()
        chunks = [np.zeros((self.spec.channels, 0), dtype=np.float32)]
        need = count
        while need > 0 and self.pending:
            chunk = self.pending.popleft()
            if chunk.shape[1] > need:
                self.pending.appendleft(chunk[:, need:])
                chunk = chunk[:, :need]
            chunks.append(chunk)
            need -= chunk.shape[1]
        self.buffered -= count - need
        if need > 0:  # past the end: silence
            chunks.append(np.zeros((self.spec.channels, need), dtype=np.float32))
        return np.concatenate(chunks, axis=1)

    def close(self) -> None:
        self.container.close()

    def _pull(self) -> None:
        frame = next(self.frames, None)
        if frame is None:
            self.done = True
        elif not self.aligned:
            self.aligned = True
            at = frame.time
            lead = 0 if at is None else round((at - self.start) * self.spec.rate)
            if lead > 0:  # audio starts after the video: silence first
                self._push(np.zeros((self.spec.channels, lead), dtype=np.float32))
            self.drop = max(0, -lead)  # audio starts before the video: cut that off
        for out in self.resampler.resample(frame):
            samples = out.to_ndarray().astype(np.float32, copy=False)
            cut = min(self.drop, samples.shape[1])
            self.drop -= cut
            self._push(samples[:, cut:])

    def _push(self, samples: Samples) -> None:
        if samples.shape[1]:
            self.pending.append(samples)
            self.buffered += samples.shape[1]


# --- output --------------------------------------------------------------------------


class _Encoder:
    """libx264 (+ AAC) into the output file; frame n's audio spans [S(n), S(n+1))."""

    def __init__(
        self,
        path: Path,
        muxer: str,
        like: VideoFacts,
        spec: _AudioSpec | None,
        crf: int,
        preset: str,
    ) -> None:
        self.fps = like.fps
        self.frames = 0
        self.container: OutputContainer = av.open(
            str(path), "w", format=muxer, options=_MUXER_OPTIONS
        )
        options = {"crf": str(crf), "preset": preset}
        self.video = self.container.add_stream("libx264", rate=self.fps, options=options)
        self.video.width, self.video.height = like.width, like.height
        self.video.pix_fmt = "yuv420p"
        self.video.thread_type = "AUTO"  # PyAV defaults to SLICE: slower sliced x264 threads
        self.time_base = Fraction(1) / self.fps
        self.audio: AudioStream | None = None
        self.spec = spec
        if spec is not None:
            self.audio = self.container.add_stream("aac", rate=spec.rate, layout=spec.layout)
            self.audio.bit_rate = spec.bit_rate

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def sample(self, n: int) -> int:
        """S(n): the first audio sample of output frame n."""
        return 0 if self.spec is None else round(n * self.spec.rate / self.fps)

    def samples_next(self) -> int:
        """Audio samples under the next output frame."""
        return self.sample(self.frames + 1) - self.sample(self.frames)

    def write(self, frame: VideoFrame, sound: Samples | None) -> None:
        frame.pts, frame.time_base = self.frames, self.time_base
        frame.pict_type = PictureType.NONE  # a decoder's I/P/B would force x264's choice
        self.container.mux(self.video.encode(frame))
        if self.audio is not None and self.spec is not None and sound is not None and sound.size:
            chunk = AudioFrame.from_ndarray(
                np.ascontiguousarray(sound), format="fltp", layout=self.spec.layout
            )
            chunk.sample_rate = self.spec.rate
            chunk.pts, chunk.time_base = self.sample(self.frames), Fraction(1, self.spec.rate)
            self.container.mux(self.audio.encode(chunk))
        self.frames += 1

    def finish(self) -> int:
        """Flushes the encoders; returns the frames written."""
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio.encode(None))
        return self.frames

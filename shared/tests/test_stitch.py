"""Stitching of video segments, on real h264/AAC mp4s encoded here with PyAV.

Every frame carries its (segment, index) in its pixels: the top half is grey level
40 + 60·segment, the bottom half 16 + 20·index, flat enough to survive h264 at crf 12
within a level or two. Audio is a 440 Hz tone on one global clock (so overlapping legs
are in phase) whose amplitude tells the segments apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from model_service.video import probe, replace_audio, stitch_chain, stitch_pieces, stitch_travel

FPS = 16
SIZE = 64
RATE = 16000  # audio sample rate
FRAMES = 9
TOLERANCE = 4.0  # grey levels


def _top(segment: int) -> float:
    return 40.0 + 60 * segment


def _bottom(index: int) -> float:
    return 16.0 + 20 * index


def _make(
    path: Path,
    segment: int,
    *,
    frames: int = FRAMES,
    size: int = SIZE,
    fps: int = FPS,
    crf: int = 12,
    audio: bool = False,
    start_frame: int = 0,
) -> Path:
    """A segment: h264 (x264 'fast': B-frames, as real outputs have) + AAC mono."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "fast"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("aac", rate=RATE, layout="mono") if audio else None
        for i in range(frames):
            planes = np.full((size * 3 // 2, size), 128, dtype=np.uint8)
            planes[: size // 2] = _top(segment)
            planes[size // 2 : size] = _bottom(i)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            first = round(start_frame * RATE / fps)  # on the global clock
            t = np.arange(first, first + round(frames * RATE / fps)) / RATE
            pcm = (_amplitude(segment) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(pcm[None], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = RATE, 0
            out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


def _amplitude(segment: int) -> float:
    return 0.1 + 0.2 * segment


def _frames(path: Path) -> list[tuple[float, float]]:
    """(top, bottom) mean luma of every decoded frame, away from the block edges."""
    levels = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            luma = frame.to_ndarray()[: frame.height]
            half = frame.height // 2
            levels.append((float(luma[4 : half - 4].mean()), float(luma[half + 4 : -4].mean())))
    return levels


def _labels(path: Path) -> list[tuple[int, int]]:
    """(segment, index) of every frame."""
    labels = []
    for top, bottom in _frames(path):
        segment, index = round((top - 40) / 60), round((bottom - 16) / 20)
        assert abs(top - _top(segment)) < TOLERANCE
        assert abs(bottom - _bottom(index)) < TOLERANCE
        labels.append((segment, index))
    return labels


def _video_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


def _audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.rate == RATE
        return np.concatenate([f.to_ndarray()[0] for f in container.decode(stream)])


def _rms(samples: np.ndarray, centre: int, half: int = 1200) -> float:
    return float(np.sqrt(np.mean(samples[centre - half : centre + half] ** 2)))


def _in_phase(samples: np.ndarray, centre: int, half: int = 1200) -> float:
    """Correlation with the tone on the output's clock: 1 when the audio is in sync."""
    window = samples[centre - half : centre + half]
    tone = np.sin(2 * np.pi * 440 * np.arange(centre - half, centre + half) / RATE)
    return float(window @ tone / np.sqrt((window @ window) * (tone @ tone)))


def _sample(frame: float) -> int:
    return round(frame * RATE / FPS)


def _check_audio_duration(path: Path, frames: int) -> None:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.duration is not None
        assert stream.time_base is not None
        seconds = float(stream.duration * stream.time_base)
    assert seconds == pytest.approx(frames / FPS, abs=1 / FPS)


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("segments")
    return [_make(root / f"seg{k}.mp4", k) for k in range(3)]


@pytest.fixture(scope="module")
def voiced(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Chain segments with audio; segment k starts at global frame 8·k (boundary shared)."""
    root = tmp_path_factory.mktemp("voiced")
    return [
        _make(root / f"seg{k}.mp4", k, audio=True, start_frame=(FRAMES - 1) * k) for k in range(3)
    ]


# --- chains --------------------------------------------------------------------------


def test_chain_drops_each_boundary_frame_once(segments: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "chain.mp4"
    result = stitch_chain(segments, out, preset="ultrafast")
    assert result.method == "reencode"
    assert result.frames == 25 == probe(out).frames
    assert result.duration_s == pytest.approx(25 / FPS)
    assert not result.has_audio
    expected = [(0, i) for i in range(9)] + [(k, i) for k in (1, 2) for i in range(1, 9)]
    assert _labels(out) == expected
    assert os.listdir(tmp_path) == ["chain.mp4"]  # the temporary file is gone


def test_chain_without_dropping_copies_packets(segments: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "copy.mp4"
    result = stitch_chain(segments, out, drop_boundary=False)
    assert result.method == "copy"
    assert result.frames == 27 == probe(out).frames
    assert _video_packets(out) == [p for s in segments for p in _video_packets(s)]
    assert _labels(out) == [(k, i) for k in range(3) for i in range(9)]


def test_copy_is_refused_when_encoder_settings_differ(segments: list[Path], tmp_path: Path) -> None:
    """Another crf changes the h264 headers (extradata): packets cannot be mixed."""
    other = _make(tmp_path / "other.mp4", 1, crf=30)
    result = stitch_chain([segments[0], other], tmp_path / "out.mp4", drop_boundary=False)
    assert result.method == "reencode"
    assert [label for label in _labels(result.path)] == [(0, i) for i in range(9)] + [
        (1, i) for i in range(9)
    ]


def test_one_segment_is_copied(segments: list[Path], tmp_path: Path) -> None:
    result = stitch_chain(segments[:1], tmp_path / "one.mp4")
    assert (result.method, result.frames) == ("copy", 9)


def test_chain_audio_follows_the_frames(voiced: list[Path], tmp_path: Path) -> None:
    result = stitch_chain(voiced, tmp_path / "chain.mp4", preset="ultrafast")
    assert result.has_audio
    assert result.frames == 25
    _check_audio_duration(result.path, 25)
    samples = _audio(result.path)
    for k, (first, last) in enumerate([(0, 9), (9, 17), (17, 25)]):  # output frames
        centre = _sample((first + last) / 2)
        assert _rms(samples, centre) == pytest.approx(_amplitude(k) / math.sqrt(2), rel=0.1)
        # output frame n is global frame n: a dropped frame's audio left in would put the
        # rest 1/16 s (27.5 periods) late, in antiphase
        assert _in_phase(samples, centre) > 0.95


def test_copied_chain_keeps_audio(voiced: list[Path], tmp_path: Path) -> None:
    result = stitch_chain(voiced, tmp_path / "copy.mp4", drop_boundary=False)
    assert result.method == "copy"
    assert result.has_audio
    _check_audio_duration(result.path, 27)
    samples = _audio(result.path)
    for k in range(3):
        expected = _amplitude(k) / math.sqrt(2)
        assert _rms(samples, _sample(9 * k + 4.5)) == pytest.approx(expected, rel=0.1)


def test_segment_without_audio_gives_silence(voiced: list[Path], tmp_path: Path) -> None:
    mute = _make(tmp_path / "mute.mp4", 1)
    result = stitch_chain([voiced[0], mute, voiced[2]], tmp_path / "out.mp4", preset="ultrafast")
    assert result.has_audio
    assert result.frames == 25
    samples = _audio(result.path)
    assert _rms(samples, _sample(13)) < 0.01
    assert _rms(samples, _sample(21)) == pytest.approx(_amplitude(2) / math.sqrt(2), rel=0.1)


# --- travel --------------------------------------------------------------------------


def test_travel_cross_fades_the_overlap(segments: list[Path], tmp_path: Path) -> None:
    overlap = 3
    result = stitch_travel(segments, tmp_path / "travel.mp4", overlap=overlap, preset="ultrafast")
    assert result.method == "reencode"
    assert result.frames == 27 - 2 * overlap == probe(result.path).frames
    expected: list[tuple[float, float]] = [(_top(0), _bottom(i)) for i in range(6)]
    for k in (1, 2):
        for j in range(overlap):
            w = (j + 1) / (overlap + 1)
            top = (1 - w) * _top(k - 1) + w * _top(k)
            bottom = (1 - w) * _bottom(FRAMES - overlap + j) + w * _bottom(j)
            expected.append((top, bottom))
        end = FRAMES - overlap if k < 2 else FRAMES
        expected += [(_top(k), _bottom(i)) for i in range(overlap, end)]
    got = _frames(result.path)
    assert len(got) == len(expected)
    for (top, bottom), (want_top, want_bottom) in zip(got, expected, strict=True):
        assert abs(top - want_top) < TOLERANCE
        assert abs(bottom - want_bottom) < TOLERANCE
    middle = got[7]  # j = 1 of the first overlap: the plain average
    assert middle[0] == pytest.approx((_top(0) + _top(1)) / 2, abs=TOLERANCE)


def test_travel_without_overlap_copies(segments: list[Path], tmp_path: Path) -> None:
    result = stitch_travel(segments, tmp_path / "travel.mp4", overlap=0)
    assert (result.method, result.frames) == ("copy", 27)


def test_travel_audio_cross_fades(tmp_path: Path) -> None:
    overlap = 3
    legs = [  # leg k starts at global frame 6·k: in phase over the overlaps
        _make(tmp_path / f"leg{k}.mp4", k, audio=True, start_frame=(FRAMES - overlap) * k)
        for k in range(3)
    ]
    result = stitch_travel(legs, tmp_path / "travel.mp4", overlap=overlap, preset="ultrafast")
    assert result.has_audio
    assert result.frames == 21
    _check_audio_duration(result.path, 21)
    samples = _audio(result.path)
    mid = (_amplitude(0) + _amplitude(1)) / 2 / math.sqrt(2)  # w = 0.5 in the middle
    assert _rms(samples, _sample(7.5), half=400) == pytest.approx(mid, rel=0.15)
    assert _rms(samples, _sample(3)) == pytest.approx(_amplitude(0) / math.sqrt(2), rel=0.1)
    assert _rms(samples, _sample(10.5)) == pytest.approx(_amplitude(1) / math.sqrt(2), rel=0.1)
    for frame in (3, 7.5, 10.5, 14, 18):  # output frame n is global frame n
        assert _in_phase(samples, _sample(frame), half=400) > 0.95


# --- per-segment transforms ---------------------------------------------------------


def _invert(rgb: np.ndarray, i: int) -> np.ndarray:
    return 255 - rgb


def _inverted(level: float) -> float:
    """A grey luma level after inverting its RGB: 235 - (level - 16) in limited range."""
    return 251.0 - level


def _close(got: list[tuple[float, float]], expected: list[tuple[float, float]]) -> None:
    assert len(got) == len(expected)
    for (top, bottom), (want_top, want_bottom) in zip(got, expected, strict=True):
        assert abs(top - want_top) < TOLERANCE
        assert abs(bottom - want_bottom) < TOLERANCE


def test_chain_transforms_one_segment(segments: list[Path], tmp_path: Path) -> None:
    plain = stitch_chain(segments, tmp_path / "plain.mp4", preset="ultrafast")
    result = stitch_chain(
        segments, tmp_path / "out.mp4", preset="ultrafast", transforms=[None, _invert, None]
    )
    assert result.method == "reencode"
    assert result.frames == plain.frames == 25 == probe(result.path).frames
    expected = [(_top(0), _bottom(i)) for i in range(9)]
    expected += [(_inverted(_top(1)), _inverted(_bottom(i))) for i in range(1, 9)]
    expected += [(_top(2), _bottom(i)) for i in range(1, 9)]
    _close(_frames(result.path), expected)


def test_transform_index_counts_per_segment(segments: list[Path], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def record(k: int) -> Callable[[np.ndarray, int], np.ndarray]:
        def transform(rgb: np.ndarray, i: int) -> np.ndarray:
            assert rgb.shape == (SIZE, SIZE, 3)
            assert rgb.dtype == np.uint8
            calls.append((k, i))
            return rgb

        return transform

    # Without a frame to drop this would be copied; a transform forces a re-encode.
    result = stitch_chain(
        segments, tmp_path / "all.mp4", drop_boundary=False, transforms=[record(0), None, record(2)]
    )
    assert result.method == "reencode"
    assert calls == [(k, i) for k in (0, 2) for i in range(9)]
    assert _labels(result.path) == [(k, i) for k in range(3) for i in range(9)]
    calls.clear()  # dropped boundary frames are counted, not transformed
    stitch_chain(segments, tmp_path / "drop.mp4", transforms=[record(k) for k in range(3)])
    assert calls == [(0, i) for i in range(9)] + [(k, i) for k in (1, 2) for i in range(1, 9)]


def test_travel_transforms_before_the_cross_fade(segments: list[Path], tmp_path: Path) -> None:
    overlap = 3
    result = stitch_travel(
        segments,
        tmp_path / "travel.mp4",
        overlap=overlap,
        preset="ultrafast",
        transforms=[None, _invert, None],
    )
    assert result.method == "reencode"
    assert result.frames == 21

    def level(k: int, i: int) -> tuple[float, float]:
        top, bottom = _top(k), _bottom(i)
        return (_inverted(top), _inverted(bottom)) if k == 1 else (top, bottom)

    expected = [level(0, i) for i in range(6)]
    for k in (1, 2):
        for j in range(overlap):
            w = (j + 1) / (overlap + 1)
            a, b = level(k - 1, FRAMES - overlap + j), level(k, j)
            expected.append(((1 - w) * a[0] + w * b[0], (1 - w) * a[1] + w * b[1]))
        end = FRAMES - overlap if k < 2 else FRAMES
        expected += [level(k, i) for i in range(overlap, end)]
    got = _frames(result.path)
    _close(got, expected)
    # j = 1 of the first overlap: the average of leg 0 and inverted leg 1 (95.5), not the
    # inverted average (181)
    assert got[7][0] == pytest.approx((_top(0) + _inverted(_top(1))) / 2, abs=TOLERANCE)


def test_bad_transforms_are_refused(segments: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 transforms for 3 segments"):
        stitch_chain(segments, tmp_path / "out.mp4", transforms=[None, _invert])
    with pytest.raises(ValueError, match="4 transforms for 3 legs"):
        stitch_travel(segments, tmp_path / "out.mp4", overlap=1, transforms=[None] * 4)
    with pytest.raises(ValueError, match="transform returned"):
        stitch_chain(
            segments, tmp_path / "out.mp4", transforms=[lambda rgb, i: rgb[1:], None, None]
        )
    assert not list(tmp_path.iterdir())
    # All None: handled as without transforms (here: copied).
    result = stitch_chain(
        segments, tmp_path / "out.mp4", drop_boundary=False, transforms=[None] * 3
    )
    assert result.method == "copy"


# --- bad inputs ----------------------------------------------------------------------


def test_mismatched_sizes_are_refused(segments: list[Path], tmp_path: Path) -> None:
    bigger = _make(tmp_path / "big.mp4", 1, size=96)
    with pytest.raises(ValueError, match="96x96.*same size"):
        stitch_chain([segments[0], bigger], tmp_path / "out.mp4")
    assert not list(tmp_path.glob("out*"))
    assert not list(tmp_path.glob(".out*"))


def test_mismatched_frame_rates_are_refused(segments: list[Path], tmp_path: Path) -> None:
    faster = _make(tmp_path / "fast.mp4", 1, fps=24)
    with pytest.raises(ValueError, match="frame rate"):
        stitch_travel([segments[0], faster], tmp_path / "out.mp4", overlap=1)


@pytest.mark.parametrize(
    ("overlap", "match"),
    [(5, "leg 1 .* needs 10"), (10, "leg 0 .* needs 10"), (-1, "0 or more")],
)
def test_bad_overlaps_are_refused(
    segments: list[Path], tmp_path: Path, overlap: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stitch_travel(segments, tmp_path / "out.mp4", overlap=overlap)


def test_other_bad_inputs_are_refused(segments: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no segments"):
        stitch_chain([], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="no legs"):
        stitch_travel([], tmp_path / "out.mp4", overlap=1)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="not a readable video"):
        stitch_chain([segments[0], junk], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="not a readable video"):
        stitch_chain([tmp_path / "missing.mp4"], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="crf"):
        stitch_chain(segments, tmp_path / "out.mp4", crf=60)
    with pytest.raises(ValueError, match="preset"):
        stitch_chain(segments, tmp_path / "out.mp4", preset="quick")
    with pytest.raises(ValueError, match=r"\.mp4"):
        stitch_chain(segments, tmp_path / "out.gif")


def test_damaged_segment_fails_cleanly(segments: list[Path], tmp_path: Path) -> None:
    """The header promises more frames than the data holds: found while re-encoding."""
    whole = stitch_chain(segments, tmp_path / "whole.mp4", drop_boundary=False).path
    damaged = tmp_path / "damaged.mp4"  # faststart: the index survives the cut
    damaged.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match="damaged"):
        stitch_chain([segments[0], damaged], tmp_path / "out.mp4", preset="ultrafast")
    assert sorted(os.listdir(tmp_path)) == ["damaged.mp4", "whole.mp4"]


def test_probe(segments: list[Path]) -> None:
    facts = probe(segments[0])
    assert (facts.frames, facts.fps, facts.width, facts.height) == (9, 16, SIZE, SIZE)
    assert (facts.codec, facts.pix_fmt, facts.audio) == ("h264", "yuv420p", None)
    assert facts.duration_s == pytest.approx(9 / 16)


# --- pieces (joins, redos) ----------------------------------------------------------


def test_pieces_keep_the_chosen_frames_of_each(segments: list[Path], tmp_path: Path) -> None:
    """A redo's shape: video 0 before its stretch, chosen frames of another, video 0 after
    it; a piece may name a file twice."""
    out = tmp_path / "redo.mp4"
    pieces = [
        (segments[0], lambda i: i < 3),
        (segments[1], {2, 4, 6}.__contains__),
        (segments[0], lambda i: i > 5),
    ]
    result = stitch_pieces(pieces, out, preset="ultrafast")
    assert result.method == "reencode"
    assert result.frames == 9 == probe(out).frames
    expected = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 4), (1, 6), (0, 6), (0, 7), (0, 8)]
    assert _labels(out) == expected
    everything = stitch_pieces([(s, None) for s in segments], tmp_path / "all.mp4")
    assert everything.method == "copy"
    assert everything.frames == 27


def test_pieces_drop_the_audio_of_dropped_frames(voiced: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "pieces.mp4"
    # segment 0's first 4 frames, then segment 1 from its frame 4: 4 + 5 frames
    result = stitch_pieces([(voiced[0], lambda i: i < 4), (voiced[1], lambda i: i >= 4)], out)
    assert result.frames == 9
    assert result.has_audio
    _check_audio_duration(out, 9)
    samples = _audio(out)
    assert _rms(samples, _sample(2)) == pytest.approx(_amplitude(0) / math.sqrt(2), rel=0.1)
    assert _rms(samples, _sample(6.5)) == pytest.approx(_amplitude(1) / math.sqrt(2), rel=0.1)


def test_replace_audio_copies_the_other_files_sound(
    segments: list[Path], voiced: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "dubbed.mp4"
    assert replace_audio(segments[2], voiced[1], out)
    assert _video_packets(out) == _video_packets(segments[2])  # the video copied as it was
    with av.open(str(voiced[1])) as container:
        original = [bytes(p) for p in container.demux(audio=0) if p.size]
    with av.open(str(out)) as container:
        assert [bytes(p) for p in container.demux(audio=0) if p.size] == original
    assert not replace_audio(segments[0], segments[1], tmp_path / "none.mp4")
    assert not (tmp_path / "none.mp4").exists()

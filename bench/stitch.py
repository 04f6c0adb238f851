"""Benchmarks of `model_service.video` stitching, each against a baseline measured in the
same run.

Ten segments like our video services' outputs (default 81 frames, 832x480, 16 fps,
h264 yuv420p crf 19 + AAC mono 44.1 kHz, made here with PyAV) are stitched:

1. Copy path: `stitch_chain(..., drop_boundary=False)` (remux with rebased timestamps,
   `+faststart`) against `ffmpeg -f concat -safe 0 -i list.txt -c copy` of the same
   files, and the same with `-movflags +faststart` (our output is faststart too).
   The sides alternate, run by run; medians. Ratio: ffmpeg time / ours.
2. Re-encode path: `stitch_chain(...)` with the boundary frames dropped (libx264 at
   `--crf`/`--preset`, frame by frame): frames per second, against `ffmpeg -f concat
   ... -c:v libx264` at the same crf and preset (a plain re-encode of all frames, no
   dropping: the cost floor). Ratio: our fps / ffmpeg's fps.
3. Colour-corrected chain (what a chain job does with `colour_correction`): each
   segment's correction fitted (`fit_segment`, the per-segment step of a chain), then the
   re-encode with each segment's correction applied frame by frame. Ratio: its fps /
   the plain re-encode's fps of step 2.

The ffmpeg baselines are skipped (and said so) when `ffmpeg` is not on PATH.

Usage: `.venv/bin/python bench/stitch.py [--segments 10] [--frames 81] [--size 832x480]
[--repeats 5] [--preset medium] [--out build/bench-stitch.json]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from model_service.video import probe, stitch_chain
from model_service.video.colour import colour_stats, fit_segment

REPO = Path(__file__).resolve().parent.parent
AUDIO_RATE = 44100


def make_segment(path: Path, k: int, frames: int, width: int, height: int, fps: int) -> None:
    """A moving pattern with moving grain (for a bitrate like real footage's) and a tone;
    segment k of a chain starts where segment k-1 ended."""
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    grain = np.random.default_rng(0).normal(0, 12, (height, width)).astype(np.float32)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "19", "preset": "fast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        for i in range(frames):
            t = (frames - 1) * k + i
            luma = 128 + 60 * np.sin((x + 3 * t) / 37) * np.cos((y - 2 * t) / 23)
            luma += np.roll(grain, 2 * t, axis=1)  # texture that moves, as real footage
            planes = np.full((height * 3 // 2, width), 128, dtype=np.uint8)
            planes[:height] = np.clip(luma, 0, 255).astype(np.uint8)
            picture = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            picture.pts, picture.time_base = i, Fraction(1, fps)
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        start = round((frames - 1) * k * AUDIO_RATE / fps)
        n = np.arange(start, start + round(frames * AUDIO_RATE / fps))
        pcm = (0.3 * np.sin(2 * np.pi * 220 * n / AUDIO_RATE)).astype(np.float32)[None]
        chunk = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = AUDIO_RATE, 0
        out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))


def ffmpeg_concat(listing: Path, out: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    command = ["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing)]
    subprocess.run([*command, *extra, str(out)], check=True)
    return time.perf_counter() - started


def bench_copy(
    segments: list[Path], root: Path, repeats: int, has_ffmpeg: bool, listing: Path
) -> dict[str, Any]:
    ours: list[float] = []
    plain: list[float] = []
    faststart: list[float] = []
    frames = 0
    for i in range(repeats + 1):  # the first round warms the page cache, untimed
        result = stitch_chain(segments, root / "copy.mp4", drop_boundary=False)
        assert result.method == "copy", result
        frames = result.frames
        if i:
            ours.append(result.seconds)
        if has_ffmpeg:
            a = ffmpeg_concat(listing, root / "ffmpeg.mp4", ["-c", "copy"])
            b = ffmpeg_concat(
                listing, root / "ffmpeg-fs.mp4", ["-c", "copy", "-movflags", "+faststart"]
            )
            if i:
                plain.append(a)
                faststart.append(b)
    report: dict[str, Any] = {
        "frames": frames,
        "bytes": (root / "copy.mp4").stat().st_size,
        "ours_median_s": round(statistics.median(ours), 4),
    }
    if has_ffmpeg:
        report |= {
            "ffmpeg_frames": probe(root / "ffmpeg.mp4").frames,
            "ffmpeg_median_s": round(statistics.median(plain), 4),
            "ffmpeg_faststart_median_s": round(statistics.median(faststart), 4),
            "ratio": round(statistics.median(plain) / statistics.median(ours), 3),
            "ratio_faststart": round(statistics.median(faststart) / statistics.median(ours), 3),
        }
    return report


def bench_reencode(
    segments: list[Path], root: Path, crf: int, preset: str, has_ffmpeg: bool, listing: Path
) -> dict[str, Any]:
    result = stitch_chain(segments, root / "chain.mp4", crf=crf, preset=preset)
    assert result.method == "reencode", result
    report: dict[str, Any] = {
        "frames": result.frames,
        "ours_s": round(result.seconds, 3),
        "ours_fps": round(result.frames / result.seconds, 2),
    }
    if has_ffmpeg:
        encode = ["-c:v", "libx264", "-crf", str(crf), "-preset", preset, "-pix_fmt", "yuv420p"]
        seconds = ffmpeg_concat(listing, root / "ffmpeg-x264.mp4", [*encode, "-c:a", "aac"])
        frames = probe(root / "ffmpeg-x264.mp4").frames
        report |= {
            "ffmpeg_frames": frames,
            "ffmpeg_s": round(seconds, 3),
            "ffmpeg_fps": round(frames / seconds, 2),
            "ratio": round(result.frames / result.seconds / (frames / seconds), 3),
        }
    return report


def bench_colour(
    segments: list[Path], root: Path, crf: int, preset: str, plain_fps: float
) -> dict[str, Any]:
    def frames(path: Path) -> list[np.ndarray]:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    reference = colour_stats(frames(segments[0])[0])
    fit_s: list[float] = []
    transforms = []
    for path in segments:
        started = time.perf_counter()
        fit = fit_segment(iter(frames(path)), reference)  # decode + statistics, as a job does
        fit_s.append(time.perf_counter() - started)
        transforms.append(fit.apply)
    result = stitch_chain(
        segments, root / "colour.mp4", crf=crf, preset=preset, transforms=transforms
    )
    fps = result.frames / result.seconds
    return {
        "fit_median_s": round(statistics.median(fit_s), 3),
        "frames": result.frames,
        "ours_s": round(result.seconds, 3),
        "ours_fps": round(fps, 2),
        "ratio_to_plain_reencode": round(fps / plain_fps, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--frames", type=int, default=81, help="frames per segment")
    parser.add_argument("--size", default="832x480", help="WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed copy runs per side")
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--preset", default="medium", help="x264 preset of the re-encode")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-stitch.json")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    has_ffmpeg = shutil.which("ffmpeg") is not None
    print(f"bench: {platform.node()} {os.cpu_count()} CPUs, PyAV {av.__version__}")
    root = Path(tempfile.mkdtemp(prefix="model-service-bench-stitch-"))
    try:
        started = time.perf_counter()
        segments = [root / f"segment{k:02d}.mp4" for k in range(args.segments)]
        for k, path in enumerate(segments):
            make_segment(path, k, args.frames, width, height, args.fps)
        listing = root / "list.txt"
        listing.write_text("".join(f"file '{p}'\n" for p in segments))
        print(
            f"segments: {args.segments} x {args.frames} frames, {width}x{height}, "
            f"{args.fps} fps, h264 crf 19 + AAC mono; made in "
            f"{time.perf_counter() - started:.1f} s"
        )
        if not has_ffmpeg:
            print("ffmpeg is not on PATH: the ffmpeg baselines are skipped")
        copy = bench_copy(segments, root, args.repeats, has_ffmpeg, listing)
        print(
            f"\n1. Copy path ({copy['frames']} frames, {copy['bytes'] / 1e6:.1f} MB, "
            f"median of {args.repeats})\n   ours (remux, faststart): {copy['ours_median_s']} s"
        )
        if has_ffmpeg:
            print(
                f"   ffmpeg -f concat -c copy: {copy['ffmpeg_median_s']} s; with +faststart: "
                f"{copy['ffmpeg_faststart_median_s']} s\n   ratio (ffmpeg time / ours): "
                f"{copy['ratio']} plain, {copy['ratio_faststart']} faststart"
            )
        reencode = bench_reencode(segments, root, args.crf, args.preset, has_ffmpeg, listing)
        print(
            f"\n2. Re-encode path (chain, boundary frames dropped, crf {args.crf}, "
            f"preset {args.preset})\n   ours: {reencode['frames']} frames in "
            f"{reencode['ours_s']} s = {reencode['ours_fps']} frames/s"
        )
        if has_ffmpeg:
            print(
                f"   ffmpeg -f concat -c:v libx264: {reencode['ffmpeg_frames']} frames in "
                f"{reencode['ffmpeg_s']} s = {reencode['ffmpeg_fps']} frames/s\n"
                f"   ratio (our fps / ffmpeg's): {reencode['ratio']}"
            )
        colour = bench_colour(segments, root, args.crf, args.preset, reencode["ours_fps"])
        print(
            f"\n3. Colour-corrected chain: fit per segment (decode + statistics) "
            f"{colour['fit_median_s']} s median; re-encode with the corrections: "
            f"{colour['frames']} frames in {colour['ours_s']} s = {colour['ours_fps']} frames/s"
            f"\n   ratio (its fps / the plain re-encode's): {colour['ratio_to_plain_reencode']}"
        )
        results = {
            "segments": args.segments,
            "frames_per_segment": args.frames,
            "size": [width, height],
            "fps": args.fps,
            "ffmpeg": has_ffmpeg,
            "copy": copy,
            "reencode": reencode,
            "colour": colour,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()

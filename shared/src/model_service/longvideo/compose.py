"""What chains and travels do with their parts' outputs (run in worker threads).

Chain, after each segment: its last frame (the lossless `last_frame.png` ComfyUI saved
beside the mp4) becomes `next_start.png`, the next segment's start image. With colour
correction on, the segment's colour statistics over time are fitted against the start
image (`fit_segment`), the fit is kept in the segment's `info`, and `next_start.png` is
the corrected last frame: the next segment starts from corrected colours, so drift does
not compound. At the end the segments are stitched with each one's correction applied
and the repeated boundary frame dropped.

Travel, at the end: the legs are stitched with their overlaps cross-faded.

Join and redo (model_service.longvideo.bridges), at the end: the caller's video(s) and
the chosen inner frames of the new parts, one re-encode at x264 crf 12 (the frames kept
from the caller's video are decoded and encoded again: visually the same, not
bit-exact); a redo then gets its video's own audio back, copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from PIL import Image

from model_service.jobs.record import Job
from model_service.logs import get_logger
from model_service.longvideo.bridges import inner_frames
from model_service.longvideo.submit import NEXT_START
from model_service.settings import Settings
from model_service.video.colour import SegmentCorrection, colour_stats, drift, fit_segment
from model_service.video.stitch import (
    FrameFilter,
    FrameTransform,
    StitchResult,
    replace_audio,
    stitch_chain,
    stitch_pieces,
    stitch_travel,
)

log = get_logger("model_service.longvideo")

LAST_FRAME = "last_frame.png"
VIDEO = "video.mp4"
SPLICE_CRF = 12  # a join's or redo's re-encode: the caller's own frames go through it


class ChainComposer:
    def __init__(self, settings: Settings, image_field: str) -> None:
        self._settings = settings
        self._image_field = image_field

    def after_part(
        self, parent: Job, child: Job, output_dir: Path, outputs: list[str]
    ) -> tuple[list[str], dict[str, Any]]:
        video = output_dir / _video_of(outputs, child.id)
        info: dict[str, Any] = {}
        if LAST_FRAME in outputs:
            last = _rgb(output_dir / LAST_FRAME)
        else:  # a workflow that cannot save it: the mp4's (lossy) last frame
            log.warning("no lossless last frame; taking it from the mp4", job_id=child.id)
            last = _last_decoded(video)
            info["handoff"] = "last frame decoded from the mp4 (lossy)"
        if parent.plan.get("colour_correction"):
            reference = colour_stats(_rgb(Path(parent.prepared_input[self._image_field])))
            start = colour_stats(_rgb(Path(child.prepared_input[self._image_field])))
            fit = fit_segment(
                _frames(video),
                reference,
                strength=float(parent.plan["colour_strength"]),
                start=start,
            )
            corrected = fit.apply_last(last)
            info["colour_correction"] = fit.to_dict()
            info["colour_drift"] = {
                "before": round(drift(colour_stats(last), reference), 3),
                "after": round(drift(colour_stats(corrected), reference), 3),
            }
            last = corrected
        Image.fromarray(last).save(output_dir / NEXT_START, format="PNG")
        return [NEXT_START], info

    def compose(
        self, parent: Job, children: list[Job], output_dir: Path
    ) -> tuple[list[str], dict[str, Any]]:
        videos = [_part_video(self._settings, child) for child in children]
        transforms: list[FrameTransform | None] = [
            SegmentCorrection.from_dict(child.info["colour_correction"]).apply
            if "colour_correction" in child.info
            else None
            for child in children
        ]
        result = stitch_chain(
            videos,
            output_dir / VIDEO,
            drop_boundary=True,
            transforms=transforms if any(transforms) else None,
        )
        return [VIDEO], _facts(result, len(children))


class _AtTheEnd:
    """A composer with nothing to do after each part, only at the end."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def after_part(
        self, parent: Job, child: Job, output_dir: Path, outputs: list[str]
    ) -> tuple[list[str], dict[str, Any]]:
        return [], {}


class TravelComposer(_AtTheEnd):
    def compose(
        self, parent: Job, children: list[Job], output_dir: Path
    ) -> tuple[list[str], dict[str, Any]]:
        legs = [_part_video(self._settings, child) for child in children]
        overlap = int(parent.plan.get("overlap", 0))
        result = stitch_travel(legs, output_dir / VIDEO, overlap=overlap)
        return [VIDEO], {**_facts(result, len(children)), "overlap": overlap}


class JoinComposer(_AtTheEnd):
    """The clips with each bridge's inner frames between them."""

    def compose(
        self, parent: Job, children: list[Job], output_dir: Path
    ) -> tuple[list[str], dict[str, Any]]:
        inner = _inner(parent)
        pieces: list[tuple[Path, FrameFilter | None]] = []
        for index, clip in enumerate(parent.prepared_input["clips"]):
            pieces.append((Path(clip), None))
            if index < len(children):
                pieces.append((_part_video(self._settings, children[index]), inner))
        result = stitch_pieces(pieces, output_dir / VIDEO, crf=SPLICE_CRF)
        return [VIDEO], {**_facts(result, len(children)), **_new_frames(parent)}


class RedoComposer(_AtTheEnd):
    """The video before the stretch, the new part's inner frames, the video after it;
    then the video's own audio."""

    def compose(
        self, parent: Job, children: list[Job], output_dir: Path
    ) -> tuple[list[str], dict[str, Any]]:
        video = Path(parent.prepared_input["video"])
        first, last = int(parent.plan["start_frame"]), int(parent.plan["end_frame"])
        pieces: list[tuple[Path, FrameFilter | None]] = [
            (video, lambda i: i < first),
            (_part_video(self._settings, children[0]), _inner(parent)),
            (video, lambda i: i > last),
        ]
        silent = output_dir / f".{VIDEO}.silent.mp4"
        result = stitch_pieces(pieces, silent, crf=SPLICE_CRF)
        if replace_audio(silent, video, output_dir / VIDEO):
            silent.unlink()
        else:
            silent.replace(output_dir / VIDEO)
        facts = {**_facts(result, 1), **_new_frames(parent), "stretch": [first, last]}
        return [VIDEO], facts


def _inner(parent: Job) -> FrameFilter:
    keep = set(inner_frames(int(parent.plan["generated_frames"]), int(parent.plan["new_frames"])))
    return keep.__contains__


def _new_frames(parent: Job) -> dict[str, Any]:
    return {
        "new_frames": parent.plan["new_frames"],
        "generated_frames": parent.plan["generated_frames"],
    }


def _part_video(settings: Settings, child: Job) -> Path:
    return settings.job_dir(child.id) / "outputs" / _video_of(child.outputs, child.id)


def _facts(result: StitchResult, parts: int) -> dict[str, Any]:
    return {
        "parts": parts,
        "frames": result.frames,
        "fps": result.fps,
        "duration_s": round(result.duration_s, 3),
        "stitch_method": result.method,
        "stitch_s": round(result.seconds, 3),
    }


def _video_of(outputs: list[str], job_id: str) -> str:
    for name in outputs:
        if name.endswith((".mp4", ".mov", ".m4v")):
            return name
    raise ValueError(f"part {job_id} made no video (outputs: {outputs})")


def _rgb(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class _frames:
    """The frames of a video as RGB arrays, decoded one at a time."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __iter__(self) -> Iterator[npt.NDArray[np.uint8]]:
        with av.open(str(self._path)) as container:
            for frame in container.decode(video=0):
                yield np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)


def _last_decoded(video: Path) -> npt.NDArray[np.uint8]:
    last = None
    for last in _frames(video):  # noqa: B007 - only the last one is kept
        pass
    if last is None:
        raise ValueError(f"{video.name} holds no frames")
    return last

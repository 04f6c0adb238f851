"""Small real media for tests, and facts read back from the videos the services write."""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image


def png_bytes(
    size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (10, 200, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_data_uri(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32)
) -> str:
    return data_uri(png_bytes(size, color))


def video_facts(data: bytes) -> dict[str, Any]:
    """Codec, size, decoded frame count and frame rate of an encoded video."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = len(list(container.decode(stream)))
        return {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": frames,
            "fps": float(stream.average_rate or 0),
        }


def video_frames(data: bytes) -> list[bytes]:
    """Each decoded frame's RGB bytes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [frame.to_ndarray(format="rgb24").tobytes() for frame in container.decode(video=0)]


def mp4_bytes(
    colours: list[tuple[int, int, int]],
    size: tuple[int, int] = (64, 64),
    fps: int = 8,
    tone_hz: float | None = None,
) -> bytes:
    """An h264 mp4 (crf 10), one solid colour per frame; with `tone_hz`, a mono AAC sine
    under it."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "10"})
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        rate = 16000
        # every stream before the first packet: the header is written then
        sound = None if tone_hz is None else out.add_stream("aac", rate=rate, layout="mono")
        for index, colour in enumerate(colours):
            rgb = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None and tone_hz is not None:
            t = np.arange(round(len(colours) * rate / fps)) / rate
            pcm = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(pcm[None], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = rate, 0
            out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return buffer.getvalue()


def frame_colours(data: bytes) -> list[Any]:
    """The mean RGB colour of each decoded frame's centre."""
    with av.open(io.BytesIO(data), mode="r") as container:
        colours = []
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24").astype(np.float64)
            h, w = rgb.shape[:2]
            colours.append(
                rgb[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0)
            )
        return colours

"""What the stand-in's nodes do when a prompt runs.

The weight-free core nodes run for real on Pillow images (`EmptyImage`, `LoadImage`,
`ImageInvert`, `RepeatImageBatch`, `ImageBatch`, `ImageFromBatch`, `SaveImage`,
`PreviewImage`, `SaveImageWebsocket` (each image a binary PNG frame on the websocket),
`CreateVideo`, `SaveVideo`, `SaveAnimatedWEBP`, and `ColorTransfer`'s
`reinhard_lab` method with `per_frame` statistics) and on PyAV-decoded audio
(`LoadAudio`); `SaveVideo` writes a real H.264 MP4 with the `ffmpeg` binary when it is on
PATH, else with PyAV, which also muxes the video's audio as AAC (as ComfyUI does). Every
other node known to the catalogue is a fake: it passes placeholders along (carrying width,
height, length and steps so that a later real node can make frames of the right size),
and sampler-like nodes emit one progress message per step (and, with the `previews` knob,
a JPEG latent-preview frame after each, as ComfyUI does with a `--preview-method`).

Wan's image-to-video latent nodes keep their start (and end) image in the placeholder, so
the decoded frames can be checked from the saved video alone: frame 0 is the start image
exactly; later frames drift in colour (the `drift` knob) and carry their index as a grey
block in the top-left corner (`index_level`, `index_block`); with an end image the frames
blend linearly from start to end, the last one being the end image exactly.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import string
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from model_service.comfy.workflow import manual_sigmas

if TYPE_CHECKING:  # imported where used: numpy is in the test environment only
    import av
    import numpy as np
    import numpy.typing as npt

META_KEYS = ("width", "height", "length", "batch_size", "steps", "fps")
MAX_FAKE_FRAMES = 512
SLOW_TICK_S = 0.05
DEFAULT_SIZE = 64
# IS_CHANGED returns the time: never taken from the cache
ALWAYS_CHANGED = frozenset({"SaveImageWebsocket"})


@dataclass
class Frames:
    """An IMAGE value: a batch of RGB frames."""

    images: list[Image.Image]


@dataclass
class Audio:
    """An AUDIO value: ComfyUI's waveform without its batch axis, [channels, samples]."""

    samples: npt.NDArray[np.float32]
    sample_rate: int


@dataclass
class Video:
    """A VIDEO value (from CreateVideo)."""

    frames: list[Image.Image]
    fps: float
    audio: Audio | None = None


@dataclass
class Placeholder:
    """What a fake node returns for each of its outputs."""

    io_type: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"<{self.io_type} placeholder {self.meta}>"


class NodeInterrupted(Exception):
    """The prompt was interrupted (ComfyUI's InterruptProcessingException)."""


class InjectedFailure(Exception):
    """A failure configured by a test; reported with the exception type it names."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass(frozen=True)
class Dirs:
    input: Path
    output: Path
    temp: Path

    def by_type(self, kind: str) -> Path | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)


@dataclass
class NodeContext:
    node_id: str
    class_type: str
    prompt: dict[str, Any]
    dirs: Dirs
    return_types: list[Any]
    progress: Callable[[int, int], Awaitable[None]]
    step_delay_s: float = 0.0
    slow_s: float = 0.0
    video_encoder: str = "auto"
    drift: float = 0.0  # colour drift of frames made from a start image, at the last frame
    # a binary image frame to the prompt's client: (format "PNG" | "JPEG", image)
    send_image: Callable[[str, Image.Image], Awaitable[None]] | None = None
    previews: bool = False  # samplers send a latent preview after each step


@dataclass
class NodeResult:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


NodeFunc = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]


async def run_node(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    if ctx.slow_s > 0:
        await _progress_bar(ctx, ctx.slow_s)
    impl = REAL_NODES.get(ctx.class_type)
    if impl is not None:
        return await impl(ctx, inputs)
    return await _fake_node(ctx, inputs)


async def _progress_bar(ctx: NodeContext, seconds: float) -> None:
    ticks = max(1, round(seconds / SLOW_TICK_S))
    for tick in range(1, ticks + 1):
        await asyncio.sleep(seconds / ticks)
        await ctx.progress(tick, ticks)


# --- values ------------------------------------------------------------------------


def as_frames(value: Any) -> list[Image.Image]:
    if isinstance(value, Frames):
        return value.images
    if isinstance(value, Video):
        return value.frames
    if isinstance(value, Placeholder):
        return _placeholder_frames(value.meta)
    raise TypeError(f"expected IMAGE, got {type(value).__name__}")


def _placeholder_frames(meta: dict[str, Any]) -> list[Image.Image]:
    count = int(meta.get("length") or meta.get("batch_size") or 1)
    width = int(meta.get("width") or DEFAULT_SIZE)
    height = int(meta.get("height") or DEFAULT_SIZE)
    count = max(1, min(count, MAX_FAKE_FRAMES))
    start = meta.get("start_image")
    if isinstance(start, Image.Image):
        end = meta.get("end_image")
        return _frames_from_images(
            _sized(start, (width, height)),
            _sized(end, (width, height)) if isinstance(end, Image.Image) else None,
            count,
            float(meta.get("drift") or 0.0),
        )
    return [Image.new("RGB", (width, height), (i * 7 % 256, 128, 128)) for i in range(count)]


def _sized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else _fit(image, size)


def index_level(index: int) -> int:
    """The grey level that marks frame `index` (frames after the first): 8 levels apart."""
    return index * 8 % 256


def index_block(width: int, height: int) -> int:
    """The side of the square index block in the top-left corner: 1/8 of the width, at
    least 16 px (smaller blocks lose more than 3 grey levels to h264 at 64x64)."""
    return min(max(16, width // 8), width, height)


def _frames_from_images(
    start: Image.Image, end: Image.Image | None, count: int, drift: float
) -> list[Image.Image]:
    """Frame 0 is `start` exactly, frame count-1 is `end` exactly when given; in between a
    linear blend (no drift), or `start` with a colour drift growing linearly to `drift` at
    the last frame: saturation and brightness times 1 + drift * t, red + 64 * drift * t."""
    import numpy as np

    first = np.asarray(start.convert("RGB"), dtype=np.float32)
    last = None if end is None else np.asarray(end.convert("RGB"), dtype=np.float32)
    side = index_block(start.width, start.height)
    frames = [start.convert("RGB").copy()]
    for i in range(1, count):
        t = i / (count - 1)
        if end is not None and last is not None:
            if i == count - 1:
                frames.append(end.convert("RGB").copy())
                continue
            pixels = first * (1 - t) + last * t
        else:
            gain = 1 + drift * t
            luma = first @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            pixels = (luma[..., None] + (first - luma[..., None]) * gain) * gain
            pixels[..., 0] += 64 * drift * t
        out = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        out[:side, :side] = index_level(i)
        frames.append(Image.fromarray(out))
    return frames


def _meta_of(value: Any) -> dict[str, Any]:
    if isinstance(value, Placeholder):
        return dict(value.meta)
    if isinstance(value, Frames) and value.images:
        width, height = value.images[0].size
        return {"width": width, "height": height, "batch_size": len(value.images)}
    if isinstance(value, Video) and value.frames:
        width, height = value.frames[0].size
        return {"width": width, "height": height, "length": len(value.frames), "fps": value.fps}
    return {}  # Audio, scalars: nothing that sizes frames


# --- saving ------------------------------------------------------------------------


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {
        "width": width,
        "height": height,
        "year": now.tm_year,
        "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}",
        "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


@dataclass(frozen=True)
class SaveTarget:
    folder: Path
    name: str
    counter: int
    subfolder: str

    def file(self, offset: int, ext: str) -> str:
        return f"{self.name}_{self.counter + offset:05}_.{ext}"


def save_target(root: Path, prefix: str, width: int = 0, height: int = 0) -> SaveTarget:
    """Where ComfyUI would save `prefix`: subfolder from its directory part, next counter."""
    prefix = os.path.normpath(_expand_prefix(prefix, width, height))
    subfolder, name = os.path.dirname(prefix), os.path.basename(prefix)
    folder = (root / subfolder).resolve()
    if os.path.commonpath((root.resolve(), folder)) != str(root.resolve()):
        raise ValueError(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {folder}\n         output_dir: {root}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return SaveTarget(folder, name, _next_counter(folder, name), subfolder)


def _next_counter(folder: Path, name: str) -> int:
    highest = 0
    for entry in os.listdir(folder):
        head, sep, rest = (
            entry[: len(name)],
            entry[len(name) : len(name) + 1],
            entry[len(name) + 1 :],
        )
        if os.path.normcase(head) != os.path.normcase(name) or sep != "_":
            continue
        digits = rest.split("_")[0]
        if digits.isdigit():
            highest = max(highest, int(digits))
    return highest + 1


def _png_info(prompt: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    return info


def _write_pngs(
    frames: list[Image.Image], target: SaveTarget, prompt: dict[str, Any] | None
) -> list[str]:
    names = []
    for i, frame in enumerate(frames):
        name = target.file(i, "png")
        frame.save(
            target.folder / name, pnginfo=_png_info(prompt) if prompt else None, compress_level=4
        )
        names.append(name)
    return names


# --- real nodes --------------------------------------------------------------------


async def empty_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    color = int(inputs["color"])
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    size = (int(inputs["width"]), int(inputs["height"]))
    return NodeResult(
        (Frames([Image.new("RGB", size, rgb) for _ in range(int(inputs["batch_size"]))]),)
    )


def _input_file(dirs: Dirs, name: str) -> Path:
    for kind in ("input", "output", "temp"):  # "x.png [output]" names another folder
        folder = dirs.by_type(kind)
        if name.endswith(f" [{kind}]") and folder is not None:
            return folder / name[: -len(kind) - 3]
    return dirs.input / name


async def load_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    path = _input_file(ctx.dirs, str(inputs["image"]))
    frames = await asyncio.to_thread(_read_frames, path)
    width, height = frames[0].size
    return NodeResult((Frames(frames), Placeholder("MASK", {"width": width, "height": height})))


def _read_frames(path: Path) -> list[Image.Image]:
    with Image.open(path) as img:
        return [
            ImageOps.exif_transpose(frame).convert("RGB") for frame in ImageSequence.Iterator(img)
        ]


async def load_audio(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    path = _input_file(ctx.dirs, str(inputs["audio"]))
    return NodeResult((await asyncio.to_thread(read_audio, path),))


async def audio_concat(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """Like ComfyUI's AudioConcat: mono becomes stereo, the lower rate is resampled to the
    higher (linear here; torchaudio's windowed sinc there), then one after the other."""
    import numpy as np

    first, second = inputs["audio1"], inputs["audio2"]
    if not isinstance(first, Audio) or not isinstance(second, Audio):  # a fake's value
        return NodeResult((first if isinstance(first, Audio) else second,))
    rate = max(first.sample_rate, second.sample_rate)
    parts = []
    for audio in (first, second):
        samples = audio.samples
        if samples.shape[0] == 1:
            samples = np.repeat(samples, 2, axis=0)
        if audio.sample_rate != rate:
            count = round(samples.shape[1] * rate / audio.sample_rate)
            positions = np.arange(count) * audio.sample_rate / rate
            samples = np.stack(
                [np.interp(positions, np.arange(samples.shape[1]), ch) for ch in samples]
            ).astype(np.float32)
        parts.append(samples)
    if inputs.get("direction") == "before":
        parts.reverse()
    return NodeResult((Audio(np.concatenate(parts, axis=1).astype(np.float32), rate),))


def read_audio(path: Path) -> Audio:
    """Like ComfyUI's LoadAudio: every frame of the first audio stream, as float PCM."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("No audio stream found in the file.")
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.channels
        chunks = []
        for frame in container.decode(stream):
            chunk = frame.to_ndarray()
            if chunk.shape[0] != channels:  # interleaved formats decode as [1, samples * C]
                chunk = chunk.reshape(-1, channels).T
            chunks.append(chunk)
    if not chunks:
        raise ValueError("No audio frames decoded.")
    pcm = np.concatenate(chunks, axis=1)
    if pcm.dtype.kind == "f":
        return Audio(pcm.astype(np.float32), rate)
    scale = {"int16": 2.0**15, "int32": 2.0**31}.get(pcm.dtype.name)
    if scale is None:
        raise ValueError(f"Unsupported wav dtype: torch.{pcm.dtype.name}")
    return Audio(pcm.astype(np.float32) / np.float32(scale), rate)


async def image_invert(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return NodeResult(
        (Frames([ImageOps.invert(f.convert("RGB")) for f in as_frames(inputs["image"])]),)
    )


async def repeat_image_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    return NodeResult((Frames(as_frames(inputs["image"]) * int(inputs["amount"])),))


async def image_from_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    frames = as_frames(inputs["image"])
    index, length = int(inputs["batch_index"]), int(inputs["length"])
    if index < 0:  # counts from the end; then clamped into the batch, as ComfyUI does
        index += len(frames)
    index = max(0, min(len(frames) - 1, index))
    return NodeResult((Frames(frames[index : index + length]),))  # length: up to the end


async def color_transfer(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """`reinhard_lab` + `per_frame` (what the services use): each frame's Lab mean and
    std moved to the reference's, lerped by strength; other methods are refused."""
    import numpy as np

    from model_service.video.colour import colour_stats, match_colours

    method, stats = inputs.get("method"), inputs.get("source_stats")
    if (method, stats) != ("reinhard_lab", "per_frame"):
        raise NotImplementedError(
            f"stand-in ColorTransfer: only reinhard_lab per_frame ({method}, {stats})"
        )
    frames, strength = as_frames(inputs["image_target"]), float(inputs["strength"])
    reference = colour_stats(np.asarray(as_frames(inputs["image_ref"])[0].convert("RGB")))

    def match(frame: Image.Image) -> Image.Image:
        pixels = np.asarray(frame.convert("RGB"))
        return Image.fromarray(
            match_colours(pixels, colour_stats(pixels), reference, min(strength, 1.0))
        )

    return NodeResult((Frames(await asyncio.to_thread(lambda: [match(f) for f in frames])),))


async def image_batch(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    first, second = as_frames(inputs["image1"]), as_frames(inputs["image2"])
    size = first[0].size
    if second[0].size != size:
        second = [_fit(frame, size) for frame in second]
    return NodeResult((Frames(first + second),))


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """ComfyUI's common_upscale(bilinear, center): crop to the target's aspect, resize."""
    width, height = image.size
    aspect, target = width / height, size[0] / size[1]
    x = round((width - width * (target / aspect)) / 2) if aspect > target else 0
    y = round((height - height * (aspect / target)) / 2) if aspect < target else 0
    return _bilinear(image.crop((x, y, width - x, height - y)), size)


def _bilinear(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torch's interpolate(mode="bilinear"): unlike Pillow's, no antialiasing when shrinking;
    float pixels truncated back to bytes, as SaveImage does."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255

    def taps(size_out: int, size_in: int) -> tuple[Any, Any, Any]:
        pos = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0)
        low = np.minimum(pos.astype(np.int64), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), (pos - low).astype(np.float32)

    (y0, y1, wy), (x0, x1, wx) = taps(size[1], image.height), taps(size[0], image.width)
    rows = pixels[y0] * (1 - wy)[:, None, None] + pixels[y1] * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return Image.fromarray(np.clip(out * 255, 0, 255).astype(np.uint8))


async def save_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    frames = as_frames(inputs["images"])
    target = save_target(ctx.dirs.output, str(inputs["filename_prefix"]), *frames[0].size)
    names = await asyncio.to_thread(_write_pngs, frames, target, ctx.prompt)
    items = [{"filename": n, "subfolder": target.subfolder, "type": "output"} for n in names]
    return NodeResult((Frames(frames),), {"images": items})


async def save_image_websocket(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """ComfyUI's custom_nodes/websocket_image_save.py: each image as the preview of a
    progress bar update (`update_absolute(step, n, ("PNG", image, None))`), no UI."""
    frames = as_frames(inputs["images"])
    for step, frame in enumerate(frames):
        await ctx.progress(step, len(frames))
        if ctx.send_image is not None:
            await ctx.send_image("PNG", frame)
    return NodeResult(())


async def preview_image(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    frames = as_frames(inputs["images"])
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))  # noqa: S311
    target = save_target(ctx.dirs.temp, f"ComfyUI_temp_{suffix}", *frames[0].size)
    names = await asyncio.to_thread(_write_pngs, frames, target, None)
    items = [{"filename": n, "subfolder": target.subfolder, "type": "temp"} for n in names]
    return NodeResult((Frames(frames),), {"images": items})


async def create_video(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    audio = inputs.get("audio")  # a fake node's AUDIO placeholder makes a silent video
    frames = list(as_frames(inputs["images"]))
    return NodeResult(
        (Video(frames, float(inputs["fps"]), audio if isinstance(audio, Audio) else None),)
    )


def _as_video(value: Any) -> Video:
    if isinstance(value, Video):
        return value
    return Video(as_frames(value), float(_meta_of(value).get("fps") or 16.0))


CONTAINER_EXT = {"auto": "mp4", "mp4": "mp4", "mkv": "mkv", "webm": "webm"}


async def save_video(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    """Either schema: 0.33's `format` combo (auto|mp4) beside a `codec` dynamic combo
    (auto|h264), or later masters' `format` dynamic combo holding `format.codec`."""
    if inputs.get("format") not in CONTAINER_EXT:  # ComfyUI drops a missing or unknown option
        raise TypeError("SaveVideo.execute() missing 1 required positional argument: 'format'")
    codec = inputs.get("format.codec") or inputs.get("codec")
    if codec is None:  # 0.33: a missing or unknown `codec` option is dropped the same way
        raise TypeError("SaveVideo.execute() missing 1 required positional argument: 'codec'")
    video = _as_video(inputs["video"])
    container = CONTAINER_EXT.get(str(inputs["format"]), "mp4")
    codec = str(codec)
    target = save_target(ctx.dirs.output, str(inputs["filename_prefix"]), *video.frames[0].size)
    name = target.file(0, container)
    await asyncio.to_thread(
        write_video, target.folder / name, video, container, codec, ctx.video_encoder
    )
    item = {"filename": name, "subfolder": target.subfolder, "type": "output"}
    return NodeResult((video,), {"images": [item], "animated": [True]})


async def save_animated_webp(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    frames = as_frames(inputs["images"])
    target = save_target(ctx.dirs.output, str(inputs["filename_prefix"]), *frames[0].size)
    name = target.file(0, "webp")
    duration = int(1000.0 / float(inputs.get("fps") or 6.0))
    lossless, quality = bool(inputs.get("lossless")), int(inputs.get("quality") or 80)
    await asyncio.to_thread(_write_webp, target.folder / name, frames, duration, lossless, quality)
    item = {"filename": name, "subfolder": target.subfolder, "type": "output"}
    return NodeResult((Frames(frames),), {"images": [item], "animated": [len(frames) > 1]})


def _write_webp(
    path: Path, frames: list[Image.Image], duration: int, lossless: bool, quality: int
) -> None:
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=duration,
        lossless=lossless,
        quality=quality,
    )


REAL_NODES: dict[str, NodeFunc] = {
    "EmptyImage": empty_image,
    "LoadImage": load_image,
    "LoadAudio": load_audio,
    "AudioConcat": audio_concat,
    "ImageInvert": image_invert,
    "RepeatImageBatch": repeat_image_batch,
    "ImageFromBatch": image_from_batch,
    "ImageBatch": image_batch,
    "ColorTransfer": color_transfer,
    "SaveImage": save_image,
    "PreviewImage": preview_image,
    "SaveImageWebsocket": save_image_websocket,
    "CreateVideo": create_video,
    "SaveVideo": save_video,
    "SaveAnimatedWEBP": save_animated_webp,
}


# --- video files -------------------------------------------------------------------

CODECS = {"auto": "libx264", "h264": "libx264", "av1": "libaom-av1"}


def write_video(
    path: Path, video: Video, container: str, codec: str, encoder: str = "auto"
) -> None:
    """A real video file: ffmpeg on PATH when allowed, else PyAV. A video with audio
    always goes through PyAV, as in ComfyUI."""
    encoder_name = (
        "libvpx-vp9" if container == "webm" and codec == "auto" else CODECS.get(codec, "libx264")
    )
    ffmpeg = shutil.which("ffmpeg") if encoder in ("auto", "ffmpeg") else None
    if ffmpeg is not None and video.audio is None:
        _write_with_ffmpeg(ffmpeg, path, video, encoder_name)
    elif encoder in ("auto", "pyav") or video.audio is not None:
        _write_with_pyav(path, video, container, encoder_name)
    else:
        raise RuntimeError("SaveVideo needs the ffmpeg binary on PATH")


def _write_with_ffmpeg(ffmpeg: str, path: Path, video: Video, encoder_name: str) -> None:
    width, height = video.frames[0].size
    raw = b"".join(frame.convert("RGB").tobytes() for frame in video.frames)
    command = [
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
    ]
    command += ["-s", f"{width}x{height}", "-r", str(video.fps), "-i", "-", "-c:v", encoder_name]
    command += ["-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)]
    done = subprocess.run(command, input=raw, capture_output=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {done.stderr.decode(errors='replace').strip()}")


def _write_with_pyav(path: Path, video: Video, container: str, encoder_name: str) -> None:
    try:
        import av  # optional: only the stand-in's SaveVideo needs it
    except ImportError as exc:
        raise RuntimeError(
            "SaveVideo needs the ffmpeg binary on PATH or PyAV (pip install av)"
        ) from exc
    width, height = video.frames[0].size
    with av.open(
        str(path), mode="w", format="matroska" if container == "mkv" else container
    ) as out:
        stream = out.add_stream(encoder_name, rate=Fraction(video.fps).limit_denominator(1000))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        audio = _add_audio(out, video, container) if video.audio is not None else None
        for frame in video.frames:
            picture = av.VideoFrame.from_image(frame.convert("RGB"))  # type: ignore[no-untyped-call]
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
        if audio is not None:
            audio_stream, sound = audio
            out.mux(audio_stream.encode(sound))
            out.mux(audio_stream.encode(None))


AUDIO_CODECS = {"webm": ("libopus", 48000)}  # webm takes no AAC; others: AAC at the source rate
AUDIO_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def _add_audio(
    out: av.container.OutputContainer, video: Video, container: str
) -> tuple[av.AudioStream, av.AudioFrame]:
    """An audio stream (added before any packet is muxed) and the video's audio as one
    frame, as ComfyUI's save_to makes it: cut to the video's duration (rounded up to a
    whole sample), never padded; PyAV splits it into encoder frames."""
    import av
    import numpy as np

    assert video.audio is not None
    rate = video.audio.sample_rate
    frame_rate = Fraction(round(video.fps * 1000), 1000)
    samples = video.audio.samples[:, : math.ceil(rate / frame_rate * len(video.frames))]
    layout = AUDIO_LAYOUTS.get(samples.shape[0], "stereo")
    sound = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    sound.sample_rate, sound.pts = rate, 0
    codec, codec_rate = AUDIO_CODECS.get(container, ("aac", rate))
    stream = out.add_stream(codec, rate=codec_rate, layout=layout)
    assert isinstance(stream, av.AudioStream)
    return stream, sound


# --- fake nodes --------------------------------------------------------------------

SAMPLERS_WITH_SIGMAS = ("SamplerCustom", "SamplerCustomAdvanced")
SAMPLERS_WITH_STEPS = ("KSampler", "KSamplerAdvanced")  # only samplers report steps
FAKE_SAVES: dict[str, tuple[str, str]] = {  # class -> (history key, extension)
    "SaveAudio": ("audio", "flac"),
    "SaveAudioMP3": ("audio", "mp3"),
    "SaveAudioOpus": ("audio", "opus"),
    "SaveWEBM": ("images", "webm"),
}


# Latent nodes whose start/end images the decoded frames show (see _placeholder_frames).
IMAGE_TO_VIDEO = (
    "Wan22ImageToVideoLatent",
    "WanImageToVideo",
    "WanFirstLastFrameToVideo",
    "WanInfiniteTalkToVideo",
)


def _keep_images(meta: dict[str, Any], inputs: dict[str, Any], drift: float) -> None:
    """The first image of each real start/end input, at the node's size, into `meta`."""
    size = (int(meta.get("width") or DEFAULT_SIZE), int(meta.get("height") or DEFAULT_SIZE))
    for key in ("start_image", "end_image"):
        meta.pop(key, None)  # a placeholder input's images are not this node's
        value = inputs.get(key)
        if isinstance(value, Frames | Video) and as_frames(value):
            meta[key] = _sized(as_frames(value)[0], size)
    if "start_image" in meta:
        meta["drift"] = drift


def _steps(class_type: str, inputs: dict[str, Any], meta: dict[str, Any]) -> int:
    if class_type in SAMPLERS_WITH_SIGMAS:
        return int(meta.get("steps") or 0)
    if class_type not in SAMPLERS_WITH_STEPS or not isinstance(inputs.get("steps"), int):
        return 0  # e.g. BasicScheduler has `steps` but reports no progress
    steps = int(inputs["steps"])
    if "start_at_step" in inputs and "end_at_step" in inputs:  # KSamplerAdvanced
        return max(0, min(int(inputs["end_at_step"]), steps) - int(inputs["start_at_step"]))
    return steps


async def _fake_node(ctx: NodeContext, inputs: dict[str, Any]) -> NodeResult:
    meta: dict[str, Any] = {}
    for value in inputs.values():
        meta.update(_meta_of(value))
    meta.update({k: v for k, v in inputs.items() if k in META_KEYS and isinstance(v, int | float)})
    if ctx.class_type == "ManualSigmas":  # a sampler fed by it runs one step per interval
        meta["steps"] = max(0, len(manual_sigmas(inputs.get("sigmas"))) - 1)
    if ctx.class_type in IMAGE_TO_VIDEO:
        _keep_images(meta, inputs, ctx.drift)
    steps = _steps(ctx.class_type, inputs, meta)
    for step in range(1, steps + 1):
        if ctx.step_delay_s > 0:
            await asyncio.sleep(ctx.step_delay_s)
        await ctx.progress(step, steps)
        if ctx.previews and ctx.send_image is not None:  # a latent preview (max 512 px)
            await ctx.send_image("JPEG", Image.new("RGB", (16, 16), (step * 37 % 256, 90, 40)))
    outputs: list[Any] = [Placeholder(str(t), dict(meta)) for t in ctx.return_types]
    if ctx.class_type == "WanInfiniteTalkToVideo":  # trim_image, which real nodes consume
        extending = inputs.get("previous_frames") is not None
        outputs[4] = int(inputs.get("motion_frame_count", 9)) if extending else 0
    return NodeResult(tuple(outputs), await _fake_ui(ctx, inputs))


async def _fake_ui(ctx: NodeContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    if ctx.class_type == "PreviewAny":
        return {"text": [str(inputs.get("source"))]}
    saved = FAKE_SAVES.get(ctx.class_type)
    if saved is None or "filename_prefix" not in inputs:
        return None
    key, ext = saved
    target = save_target(ctx.dirs.output, str(inputs["filename_prefix"]))
    name = target.file(0, ext)
    (target.folder / name).write_bytes(b"stand-in placeholder, not a real media file\n")
    ui: dict[str, Any] = {
        key: [{"filename": name, "subfolder": target.subfolder, "type": "output"}]
    }
    if key == "images":
        ui["animated"] = [True]
    return ui

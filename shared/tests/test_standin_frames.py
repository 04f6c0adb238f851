"""The stand-in's image-to-video frames, checked from its saved MP4s alone.

Wan's latent nodes keep their start (and end) image; the decoded frames then start with
it exactly, carry their index as a grey block in the top-left corner, drift in colour
with the `drift` knob, and blend to the end image in first-last-frame graphs.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from model_service.comfy import ComfyClient
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.comfy_standin.nodes import (
    Frames,
    Placeholder,
    as_frames,
    index_block,
    index_level,
)

Graph = dict[str, Any]
Pixels = npt.NDArray[np.float64]

SIZE, LENGTH = 64, 17
UNET_5B = "Wan2_2-TI2V-5B-FastWanFullAttn_bf16.safetensors"
UNET_HIGH, UNET_LOW = "wan_i2v_high.safetensors", "wan_i2v_low.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE_22, VAE_21 = "wan2.2_vae.safetensors", "wan_2.1_vae.safetensors"
MODELS = {
    "diffusion_models": [UNET_5B, UNET_HIGH, UNET_LOW],
    "text_encoders": [TEXT_ENCODER],
    "vae": [VAE_22, VAE_21],
}
CODE_TOLERANCE = 3  # grey levels: the index code after h264 at the stand-in's settings
FRAME_ERROR = 4.0  # mean absolute error of a decoded frame against its source image


def gradient(flip: bool = False) -> Image.Image:
    ramp = np.arange(SIZE, dtype=np.uint8) * 4
    x, y = np.meshgrid(ramp, ramp)
    pixels = np.stack([x, y, np.full_like(x, 96)], axis=-1)
    return Image.fromarray(pixels[::-1, ::-1] if flip else pixels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def text_nodes(clip: str) -> Graph:
    return {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": [clip, 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [clip, 0]}},
        clip: {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": TEXT_ENCODER, "type": "wan", "device": "default"},
        },
    }


def video_nodes(images: list[Any], prefix: str) -> Graph:
    save = {"video": ["57", 0], "filename_prefix": prefix, "format": "mp4", "codec": "h264"}
    return {
        "57": {"class_type": "CreateVideo", "inputs": {"fps": 16.0, "images": images}},
        "58": {"class_type": "SaveVideo", "inputs": save},
    }


def ti2v_graph(image: str, prefix: str) -> Graph:
    """fastwan_ti2v.json's node set, small."""
    sampler = {"seed": 0, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
    latent = {"width": SIZE, "height": SIZE, "length": LENGTH, "batch_size": 1}
    return {
        **text_nodes("38"),
        "3": {
            "class_type": "KSampler",
            "inputs": {
                **sampler,
                "denoise": 1.0,
                "model": ["48", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["55", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
        "37": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": UNET_5B, "weight_dtype": "default"},
        },
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_22}},
        "48": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 5.0, "model": ["37", 0]}},
        "55": {
            "class_type": "Wan22ImageToVideoLatent",
            "inputs": {**latent, "vae": ["39", 0], "start_image": ["56", 0]},
        },
        "56": {"class_type": "LoadImage", "inputs": {"image": image}},
        **video_nodes(["8", 0], prefix),
    }


def flf_graph(start: str, end: str, prefix: str) -> Graph:
    """wan14b_flf.json's node set, small: two experts, first and last frame."""
    common = {"cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "steps": 4}
    conditioning = {"positive": ["12", 0], "negative": ["12", 1]}
    graph: Graph = {
        **text_nodes("38"),
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_21}},
        "11": {"class_type": "LoadImage", "inputs": {"image": start}},
        "18": {"class_type": "LoadImage", "inputs": {"image": end}},
        "12": {
            "class_type": "WanFirstLastFrameToVideo",
            "inputs": {
                "positive": ["6", 0],
                "negative": ["7", 0],
                "vae": ["10", 0],
                "width": SIZE,
                "height": SIZE,
                "length": LENGTH,
                "batch_size": 1,
                "start_image": ["11", 0],
                "end_image": ["18", 0],
            },
        },
        "13": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                **common,
                **conditioning,
                "model": ["1", 0],
                "add_noise": "enable",
                "noise_seed": 0,
                "latent_image": ["12", 2],
                "start_at_step": 0,
                "end_at_step": 2,
                "return_with_leftover_noise": "enable",
            },
        },
        "14": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                **common,
                **conditioning,
                "model": ["2", 0],
                "add_noise": "disable",
                "noise_seed": 0,
                "latent_image": ["13", 0],
                "start_at_step": 2,
                "end_at_step": 10000,
                "return_with_leftover_noise": "disable",
            },
        },
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["10", 0]}},
        **video_nodes(["15", 0], prefix),
    }
    for node, unet in (("1", UNET_HIGH), ("2", UNET_LOW)):
        graph[node] = {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": unet, "weight_dtype": "default"},
        }
    return graph


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    base = tmp_path_factory.mktemp("frames") / "base"
    with StandinProcess(base, models=MODELS) as process:
        yield process


def render(
    standin: StandinProcess, images: list[Image.Image], build: Any, dest: Path
) -> list[Pixels]:
    """Upload `images`, run `build(*names, prefix)`, return the MP4's frames as RGB floats."""

    async def scenario() -> None:
        async with ComfyClient(standin.url) as client:
            tag = uuid.uuid4().hex[:10]  # fresh names: no cached node outputs
            names = [
                await client.upload(png(image), f"{tag}-{i}.png", subfolder="frames")
                for i, image in enumerate(images)
            ]
            result = await client.run(build(*names, f"frames/{tag}"), timeout_s=120)
            assert len(result.outputs) == 1
            await client.download(result.outputs[0], dest)

    asyncio.run(scenario())
    with av.open(str(dest)) as container:
        return [
            frame.to_ndarray(format="rgb24").astype(np.float64)
            for frame in container.decode(video=0)
        ]


def code_of(frame: Pixels) -> float:
    """The grey level in the middle of the index block."""
    side = index_block(frame.shape[1], frame.shape[0])
    quarter = side // 4
    return float(frame[quarter : side - quarter, quarter : side - quarter].mean())


def error(frame: Pixels, image: Image.Image, skip_block: bool = False) -> float:
    expected = np.asarray(image, dtype=np.float64)
    diff = np.abs(frame - expected)
    if skip_block:
        side = index_block(image.width, image.height)
        diff[:side, :side] = 0
    return float(diff.mean())


def assert_index_codes(frames: list[Pixels], indices: range) -> None:
    for i in indices:
        level = code_of(frames[i])
        assert abs(level - index_level(i)) <= CODE_TOLERANCE, (i, level, index_level(i))


# --- in process: exact pixels -----------------------------------------------------------


def test_frames_start_and_end_with_the_given_images_exactly() -> None:
    start, end = gradient(), gradient(flip=True)
    meta = {"width": SIZE, "height": SIZE, "length": 5, "start_image": start, "drift": 0.1}
    frames = as_frames(Placeholder("IMAGE", meta))
    assert len(frames) == 5
    assert frames[0].tobytes() == start.tobytes()
    side = index_block(SIZE, SIZE)
    for i, frame in enumerate(frames[1:], start=1):
        assert frame.getpixel((0, 0)) == (index_level(i),) * 3
        assert frame.getpixel((side - 1, side - 1)) == (index_level(i),) * 3
        assert frame.getpixel((side, side)) != (index_level(i),) * 3

    blended = as_frames(Placeholder("IMAGE", {**meta, "end_image": end}))
    assert blended[0].tobytes() == start.tobytes()
    assert blended[-1].tobytes() == end.tobytes()
    middle = np.asarray(blended[2], dtype=np.float64)[side:]
    halfway = (np.asarray(start, dtype=np.float64) + np.asarray(end, dtype=np.float64)) / 2
    assert np.abs(middle - halfway[side:]).max() <= 0.5 + 1e-9  # no drift between the two


def test_frames_without_a_start_image_are_unchanged() -> None:
    frames = as_frames(Placeholder("IMAGE", {"width": 8, "height": 4, "length": 40}))
    assert [f.getpixel((3, 2)) for f in frames] == [(i * 7 % 256, 128, 128) for i in range(40)]
    assert [f.size for f in frames] == [(8, 4)] * 40


def test_start_image_is_fitted_to_the_latent_size() -> None:
    wide = Frames([Image.new("RGB", (128, 64), (200, 10, 10))])
    meta = {"width": 32, "height": 32, "length": 3, "start_image": wide.images[0]}
    frames = as_frames(Placeholder("IMAGE", meta))
    assert [f.size for f in frames] == [(32, 32)] * 3
    assert frames[0].getpixel((16, 16)) == (200, 10, 10)


# --- through the stand-in: from the MP4 alone ------------------------------------------


def test_image_to_video_starts_from_the_start_image(
    standin: StandinProcess, tmp_path: Path
) -> None:
    start = gradient()
    frames = render(standin, [start], ti2v_graph, tmp_path / "ti2v.mp4")
    assert len(frames) == LENGTH
    assert frames[0].shape == (SIZE, SIZE, 3)
    assert error(frames[0], start) < FRAME_ERROR
    assert abs(code_of(frames[0]) - code_of(np.asarray(start, dtype=np.float64))) <= 3
    assert_index_codes(frames, range(1, LENGTH))
    for frame in frames[1:]:  # no drift by default: the picture stays the start image
        assert error(frame, start, skip_block=True) < FRAME_ERROR


def test_drift_grows_monotonically_to_the_last_frame(
    standin: StandinProcess, tmp_path: Path
) -> None:
    start = gradient()
    standin.configure(drift=0.2)
    try:
        frames = render(standin, [start], ti2v_graph, tmp_path / "drift.mp4")
    finally:
        standin.configure(reset=True)
    assert len(frames) == LENGTH
    assert error(frames[0], start) < FRAME_ERROR
    assert_index_codes(frames, range(1, LENGTH))
    side = index_block(SIZE, SIZE)
    red = [float(frame[side:, :, 0].mean()) for frame in frames]  # below the index block
    start_red = float(np.asarray(start, dtype=np.float64)[side:, :, 0].mean())
    assert abs(red[0] - start_red) < 2
    assert red[-1] - red[0] > 20, red
    every_other = red[::2]  # strictly up; h264 may wobble a frame by a fraction of a level
    assert all(b > a for a, b in itertools.pairwise(every_other)), red
    assert all(b > a - 0.5 for a, b in itertools.pairwise(red)), red


def test_first_last_frame_travels_from_start_to_end(
    standin: StandinProcess, tmp_path: Path
) -> None:
    start, end = gradient(), gradient(flip=True)
    frames = render(standin, [start, end], flf_graph, tmp_path / "flf.mp4")
    assert len(frames) == LENGTH
    assert error(frames[0], start) < FRAME_ERROR
    assert error(frames[-1], end) < FRAME_ERROR
    assert_index_codes(frames, range(1, LENGTH - 1))
    side = index_block(SIZE, SIZE)
    halfway = Image.blend(start, end, 0.5)
    assert error(frames[LENGTH // 2], halfway, skip_block=True) < FRAME_ERROR
    towards_end = [error(frame[side:], end.crop((0, side, SIZE, SIZE))) for frame in frames]
    assert all(b < a for a, b in itertools.pairwise(towards_end)), towards_end

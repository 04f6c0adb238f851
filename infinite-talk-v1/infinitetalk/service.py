"""`infinite-talk-v1`: a talking video from one image and speech, with InfiniteTalk on
ComfyUI's native nodes (Wan2.1 I2V 14B + the InfiniteTalk patch + wav2vec2 audio
features + the lightx2v step-distill LoRA).

One window is `window_frames` frames (81, 3.24 s at 25 fps). Longer speech is made of
chained windows inside one job and one ComfyUI prompt: each window after the first takes
the frames so far as `previous_frames`, so it continues from the last 9 of them (their
motion) and its audio starts where they end; its first 9 decoded frames repeat those
and are dropped. The result is cut to the audio's length and the audio is muxed in.
"""

from __future__ import annotations

import math
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from infinitetalk import legacy
from infinitetalk.schema import FPS, MOTION_FRAMES, RESOLUTIONS, InfiniteTalkInput
from model_service.api.legacy_video import video_routers
from model_service.audio import audio_duration, normalize_loudness
from model_service.comfy.engine import ComfyServiceSpec
from model_service.comfy.workflow import Bind, Graph, Workflow, chain_loras
from model_service.service import ServiceSpec

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"

# node ids of the workflow file (window 1 and the end)
AUDIO, PATCH, IMAGE, WINDOW, SAMPLER, NOISE, DECODE, TRIM, VIDEO = (
    "5", "3", "11", "12", "13", "16", "18", "19", "20",
)  # fmt: skip
LIGHTX2V = "2"  # LoraLoaderModelOnly of the step-distill LoRA, on the UNETLoader ("1")
# Two people need InfiniteTalk's multi-person weights (per-person audio routing): the
# authors' README multi-person example loads `multi/infinitetalk.safetensors`, ComfyUI's
# two-speaker template (video_wan2_1_infinitetalk.json) this file.
MULTI_PATCH = "wan2.1_infiniteTalk_multi_fp16.safetensors"
# CLIP-H image features of the face for every window (the authors' `clip_fea`; the
# template has none): `clip_vision` option, off by default until a GPU A/B decides.
CLIP_VISION = "clip_vision_h.safetensors"


def plan(values: Mapping[str, Any]) -> dict[str, Any]:
    """From the job's local files: frames for the speech, windows, and the size."""
    seconds = audio_duration(Path(values["audio"]))
    if values.get("second_audio"):
        seconds += audio_duration(Path(values["second_audio"]))
    frames = max(5, round(seconds * FPS))
    window = int(values["window_frames"])
    if frames <= window:  # one window, as short as the speech allows (4n+1)
        window = frames + (-(frames - 1) % 4)
        windows = 1
    else:
        windows = 1 + math.ceil((frames - window) / (window - MOTION_FRAMES))
    width, height = values.get("width"), values.get("height")
    if width is None or height is None:
        with Image.open(values["image"]) as image:
            width, height = fit(image.size, RESOLUTIONS[values["resolution"]])
    return {
        **_encoder_audio(values),
        "audio_s": round(seconds, 3),
        "frames": frames,
        "windows": windows,
        "window_frames": window,
        "width": width,
        "height": height,
    }


def _encoder_audio(values: Mapping[str, Any]) -> dict[str, Any]:
    """What the audio encoder hears: each speech at -23 LUFS (InfiniteTalk's
    `loudness_norm`), a copy beside the job's input; the video keeps the original sound."""
    found: dict[str, Any] = {}
    for field, target in (("audio", "encoder_audio"), ("second_audio", "second_encoder_audio")):
        if not values.get(field):
            continue
        source = Path(values[field])
        if not values.get("loudness_norm", True):
            found[target] = str(source)
            continue
        normalized = source.with_name(f"{source.stem}_for_encoder.wav")
        measured = normalize_loudness(source, normalized)
        found[target] = str(normalized)
        found[f"{field}_lufs"] = None if measured is None else round(measured, 1)
    return found


def fit(size: tuple[int, int], pixels: int) -> tuple[int, int]:
    """The image's aspect ratio at about `pixels` pixels, sides multiples of 16."""
    aspect = size[0] / size[1]
    height = math.sqrt(pixels / aspect)
    return max(64, round(height * aspect / 16) * 16), max(64, round(height / 16) * 16)


def chain_windows(graph: Graph, values: Mapping[str, Any]) -> None:
    """Window 1 is in the file; add windows 2..n, each continuing the frames so far,
    then cut the frames to the speech's length. Two speakers: the second speaker's
    audio features and both masks go to every window, and the audio track is both
    voices one after the other (as InfiniteTalk places them)."""
    two = bool(values.get("second_audio"))
    if two:
        _add_second_speaker(graph)
    next_id = max(int(n) for n in graph if n.isdigit()) + 1

    def add(node: dict[str, Any]) -> str:
        nonlocal next_id
        node_id, next_id = str(next_id), next_id + 1
        graph[node_id] = node
        return node_id

    strength = float(values.get("colour_correction", COLOUR_CORRECTION))

    def corrected(frames: list[Any], index: int) -> list[Any]:
        """A window's frames with their colours matched to the face, before the next
        window continues from them (InfiniteTalk's `match_and_blend_colors`)."""
        if strength <= 0:
            return frames
        return [add(colour_transfer(frames, [IMAGE, 0], strength, index)), 0]

    frames_so_far = corrected([DECODE, 0], 1)

    for index in range(2, int(values["windows"]) + 1):
        window = add(
            {
                "class_type": "WanInfiniteTalkToVideo",
                "inputs": {**graph[WINDOW]["inputs"], "previous_frames": frames_so_far},
                "_meta": {"title": f"Window {index}"},
            }
        )
        steps = dict(graph["14"]["inputs"], model=[window, 0])
        scheduler = add({"class_type": "BasicScheduler", "inputs": steps})
        noise = add(  # fresh noise per window, as the authors draw it (seed + window - 1)
            {
                "class_type": "RandomNoise",
                "inputs": {"noise_seed": window_seed(graph[NOISE]["inputs"]["noise_seed"], index)},
                "_meta": {"title": f"Noise, window {index}"},
            }
        )
        guider = add(
            {
                "class_type": "CFGGuider",
                "inputs": {
                    "model": [window, 0],
                    "positive": [window, 1],
                    "negative": [window, 2],
                    "cfg": graph["15"]["inputs"]["cfg"],
                },
            }
        )
        sampled = add(
            {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": [noise, 0],
                    "guider": [guider, 0],
                    "sampler": [SAMPLER, 0],
                    "sigmas": [scheduler, 0],
                    "latent_image": [window, 3],
                },
            }
        )
        decoded = add(
            {"class_type": "VAEDecode", "inputs": {"samples": [sampled, 0], "vae": ["10", 0]}}
        )
        new = add(  # without the frames that repeat the previous window's last ones
            {
                "class_type": "ImageFromBatch",
                "inputs": {
                    "image": corrected([decoded, 0], index),
                    "batch_index": [window, 4],
                    "length": 4096,
                },
            }
        )
        joined = add(
            {"class_type": "ImageBatch", "inputs": {"image1": frames_so_far, "image2": [new, 0]}}
        )
        frames_so_far = [joined, 0]
    graph[TRIM]["inputs"]["image"] = frames_so_far
    graph[TRIM]["inputs"]["length"] = int(values["frames"])


# InfiniteTalk's `--color_correction_strength` default (generate_infinitetalk.py: 1.0).
COLOUR_CORRECTION = 1.0


def colour_transfer(
    frames: list[Any], reference: list[Any], strength: float, index: int
) -> dict[str, Any]:
    """ComfyUI 0.33's core `ColorTransfer` set as InfiniteTalk's `match_and_blend_colors`
    (wan/utils/multitalk_utils.py): each frame's Lab mean and std moved to the reference
    image's (Reinhard, per frame), blended with the frame by `strength`."""
    return {
        "class_type": "ColorTransfer",
        "inputs": {
            "image_target": frames,
            "image_ref": reference,
            "method": "reinhard_lab",
            "source_stats": "per_frame",
            "strength": strength,
        },
        "_meta": {"title": f"Colours as the face's, window {index}"},
    }


def window_seed(seed: int, index: int) -> int:
    """Window `index`'s noise seed (window 1 has the job's). InfiniteTalk
    (`generate_infinitetalk.py`) seeds once and draws fresh `torch.randn` noise for every
    clip; ComfyUI's template gives each window a random seed of its own. Consecutive seeds
    keep a job reproducible from its one seed while no two windows start from the same
    noise (which repeats texture and motion every 72 frames)."""
    return (int(seed) + index - 1) % 2**32


def _add_second_speaker(graph: Graph) -> None:
    graph[PATCH]["inputs"]["name"] = MULTI_PATCH
    graph["30"] = {"class_type": "LoadAudio", "inputs": {"audio": "second.wav"}}
    graph["35"] = {"class_type": "LoadAudio", "inputs": {"audio": "second_for_encoder.wav"}}
    graph["31"] = {
        "class_type": "AudioEncoderEncode",
        "inputs": {"audio_encoder": ["4", 0], "audio": ["35", 0]},
    }
    for node_id, mask in (("32", "mask_1"), ("33", "mask_2")):
        graph[node_id] = {
            "class_type": "LoadImageMask",
            "inputs": {"image": mask, "channel": "red"},
        }
    graph["34"] = {
        "class_type": "AudioConcat",
        "inputs": {"audio1": [AUDIO, 0], "audio2": ["30", 0], "direction": "after"},
    }
    window = graph[WINDOW]["inputs"]
    window["mode"] = "two_speakers"
    window["mode.audio_encoder_output_2"] = ["31", 0]
    window["mode.mask_1"] = ["32", 0]
    window["mode.mask_2"] = ["33", 0]
    graph[VIDEO]["inputs"]["audio"] = ["34", 0]


def add_clip_vision(graph: Graph) -> None:
    """The face's CLIP-H features into window 1 (later windows copy its inputs): as
    InfiniteTalk's `clip_fea` (the whole image resized to 224, uncropped: `crop` none, as
    in ComfyUI's Wan2.1 image-to-video template)."""
    graph["41"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}}
    graph["42"] = {
        "class_type": "CLIPVisionEncode",
        "inputs": {"clip_vision": ["41", 0], "image": [IMAGE, 0], "crop": "none"},
        "_meta": {"title": "Face, CLIP-H features"},
    }
    graph[WINDOW]["inputs"]["clip_vision_output"] = ["42", 0]


def apply_loras(graph: Graph, values: Mapping[str, Any]) -> None:
    """The job's LoRAs (their ComfyUI names filled in by the engine) as a chain of
    LoraLoaderModelOnly on the Wan2.1 I2V 14B model after the lightx2v LoRA, feeding every
    window's WanInfiniteTalkToVideo (which adds the InfiniteTalk patch to the model it
    gets): where ComfyUI's template has its one model LoRA (comfyui-workflow-templates-json
    video_wan2_1_infinitetalk.json: UNETLoader 13 -> LoraLoaderModelOnly 179 (lightx2v)
    -> WanInfiniteTalkToVideo 129 `model`). Run after the windows are chained: new node
    ids then follow every other node's."""
    loras = values.get("loras") or []
    if not loras:
        return
    chosen = [(str(lora["lora_name"]), float(lora["strength"])) for lora in loras]
    windows = [
        node
        for node in graph.values()
        if node["class_type"] == "WanInfiniteTalkToVideo"
        and node["inputs"].get("model") == [LIGHTX2V, 0]
    ]
    chain_loras(graph, LIGHTX2V, (WINDOW, "model"), chosen)
    for window in windows:
        window["inputs"]["model"] = graph[WINDOW]["inputs"]["model"]


def _media_after_adjust(graph: Graph, values: Mapping[str, Any]) -> None:
    if not values.get("encoder_audio"):  # no normalised copy (`plan` not run): the speech
        graph["40"]["inputs"]["audio"] = graph[AUDIO]["inputs"]["audio"]
    if values.get("clip_vision"):
        add_clip_vision(graph)
    chain_windows(graph, values)
    if values.get("second_audio"):  # the second speaker's files, uploaded by the engine
        graph["30"]["inputs"]["audio"] = values["second_audio"]
        graph["35"]["inputs"]["audio"] = (
            values.get("second_encoder_audio") or values["second_audio"]
        )
        graph["32"]["inputs"]["image"] = values["mask_1"]
        graph["33"]["inputs"]["image"] = values["mask_2"]
    apply_loras(graph, values)


TALK = Workflow.load(
    HERE / "workflows" / "infinitetalk.json",
    bind={
        "prompt": "8.text",
        "seed": "16.noise_seed",
        "steps": "14.steps",
        "audio_scale": "12.audio_scale",
        "width": "12.width",
        "height": "12.height",
        "window_frames": "12.length",
        "image": Bind("11.image", media="image"),
        "audio": Bind("5.audio", media="audio"),
        "encoder_audio": Bind("40.audio", media="audio"),
        # no node to bind to until `adjust` adds the second speaker's: the engine uploads
        # these files and `adjust` places their ComfyUI names
        "second_audio": Bind(media="audio"),
        "second_encoder_audio": Bind(media="audio"),
        "mask_1": Bind(media="image"),
        "mask_2": Bind(media="image"),
    },
    outputs={"21": "video"},
    name="talk",
    adjust=_media_after_adjust,
)


def warmup_input(scratch: Path) -> dict[str, Any]:
    """The warm-up job (WARMUP): one face and 0.2 s of a tone, so one window of 5 frames
    at 64x64 and 2 steps. It runs every loader a job's graph has (Wan2.1 I2V 14B with the
    InfiniteTalk patch and the lightx2v LoRA, wav2vec2, UMT5, the VAE) with the same
    inputs, so ComfyUI keeps the models loaded and its loader nodes cached."""
    image, audio = scratch / "face.png", scratch / "speech.wav"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    rate = 16000
    tone = (int(8000 * math.sin(2 * math.pi * 220 * i / rate)) for i in range(rate // 5))
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(sample.to_bytes(2, "little", signed=True) for sample in tone))
    values = InfiniteTalkInput(
        image=str(image), audio=str(audio), width=64, height=64, steps=2, seed=0
    )
    return values.model_dump(mode="json")


SERVICE = ServiceSpec(
    name="infinite-talk-v1",
    title="InfiniteTalk",
    version="0.1.0",
    description=(
        "InfiniteTalk on an embedded ComfyUI: one image and speech in, a talking video out "
        "(h264 mp4 with the speech), any length up to MAX_AUDIO_S, in chained windows."
    ),
    default_port=8189,
    input_model=InfiniteTalkInput,
    predictor=None,
    min_vram_gb=24.0,
    extra_routes=video_routers(legacy.GenerateRequest, legacy.to_input),
    comfy=ComfyServiceSpec(
        workflows={"talk": TALK},
        choose=lambda values: "talk",
        manifest=MANIFEST,
        download_at_start=True,
        derive=plan,
        warmup_input=warmup_input,
        lora_field="loras",
        lora_base="Wan2.1 I2V 14B (480p)",
    ),
)

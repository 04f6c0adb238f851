"""A tiny random-weight Qwen-Image-Edit pipeline, built locally on CPU (profile `tiny`).

Same classes and folder layout as the real `Qwen/Qwen-Image-Edit*` repos, so it loads
through the same `Pipeline.from_pretrained(folder)` path; only the sizes are tiny
(about 2 MB). It is for demos and tests: its images are noise. The folder carries a
`TINY_MODEL.txt` marker and `"_tiny": true` in `model_index.json` so nothing mistakes
it for real weights. See `shared/reference/tiny-qwen-notes.md` for the traps.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .manifest import DEFAULT_VARIANT, VARIANTS

TINY_SUBDIR = Path("tiny") / "qwen-image-edit"
TINY_LIGHTNING = "tiny/qwen-image-edit-lightning-{steps}steps-lora.safetensors"
TINY_LORA_RANK = 4
MARKER_FILE = "TINY_MODEL.txt"
MARKER_KEY = "_tiny"
SEED = 0
_CORPUS = [  # the system prompt, so that its words become single tokens (gotcha 7)
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should "
    "alter or modify the image. Generate a new image that meets the user's requirements "
    "while maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n",
    "Picture 1: Picture 2: Picture 3: make the sky blue and add a red hat to the cat.",
    "Replace the background with a beach at sunset; keep the person unchanged.",
    "Turn the photo into a watercolor painting, remove the text, 0123456789.",
]
_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_BPE_VOCAB = 512


def apply_torchvision_shim() -> None:
    """Let transformers' Qwen2VLProcessor work without torchvision (gotcha 1).

    transformers 5.x gives the processor a torchvision-only `video_processor`; without a
    usable torchvision, building, saving and loading the processor fail. The pipelines
    never feed videos, so the shim drops that attribute. Applied only when torchvision
    cannot be imported; idempotent.
    """
    if _torchvision_usable():
        return
    from transformers.processing_utils import ProcessorMixin

    if getattr(ProcessorMixin, "_qwen_edit_video_shim", False):
        return
    original = ProcessorMixin.get_attributes.__func__  # type: ignore[attr-defined]

    def get_attributes(cls: type[ProcessorMixin]) -> list[str]:
        return [name for name in original(cls) if name != "video_processor"]

    ProcessorMixin.get_attributes = classmethod(get_attributes)  # type: ignore[method-assign,assignment]
    ProcessorMixin._qwen_edit_video_shim = True  # type: ignore[attr-defined]


def _torchvision_usable() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:
        return False
    return True


def is_tiny_folder(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def ensure_tiny_pipeline(models_dir: Path, *, variant: str = DEFAULT_VARIANT) -> Path:
    """The tiny pipeline folder under `models_dir`, built once (atomically) if missing."""
    target = Path(models_dir) / TINY_SUBDIR
    if is_tiny_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        build_tiny_pipeline(tmp, variant=variant)
        try:
            os.rename(tmp, target)  # atomic; fails if another process won the race
        except OSError:
            if not is_tiny_folder(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline(folder: Path, *, variant: str = DEFAULT_VARIANT) -> Path:
    """Write a random-weight pipeline of the real classes into `folder` (seeded)."""
    apply_torchvision_shim()
    spec = VARIANTS[variant]
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(SEED)
        components: dict[str, Any] = {
            "tokenizer": tokenizer,
            "processor": _processor(tokenizer),
            "text_encoder": _text_encoder(tokenizer),
            "transformer": _transformer(),
            "vae": _vae(),
            "scheduler": _scheduler(),
        }
    for class_name in sorted({v.pipeline_class for v in VARIANTS.values()}):  # one folder
        _check_prompt_prefix(_pipeline_class(class_name)(**components))
    pipe = _pipeline_class(spec.pipeline_class)(**components)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Portability: with torchvision installed, transformers loads the image processor
    # from this file (the shim does not need it; untested there, notes gotcha 1).
    components["processor"].image_processor.save_pretrained(folder / "processor")
    _mark(folder, variant)
    return folder


def ensure_tiny_lightning_lora(models_dir: Path, steps: int, transformer: Any) -> Path:
    """A random-weight stand-in for a Lightning LoRA, for the tiny profile (built once).

    lightx2v's layout (`<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`, as
    ModelTC/Qwen-Image-Lightning's generate_with_diffusers.py reads it) over every linear
    layer of the transformer's blocks, seeded by `steps`: it goes through the same
    diffusers load-and-fuse path as the real file. Its effect is noise, like the model's.
    """
    path = Path(models_dir) / TINY_LIGHTNING.format(steps=steps)
    if path.is_file():
        return path
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED + steps)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in transformer.transformer_blocks.named_modules():
        if isinstance(layer, torch.nn.Linear):
            key = f"transformer_blocks.{name}"
            shape_down = (TINY_LORA_RANK, layer.in_features)
            shape_up = (layer.out_features, TINY_LORA_RANK)
            tensors[f"{key}.lora_down.weight"] = torch.randn(shape_down, generator=generator)
            tensors[f"{key}.lora_up.weight"] = torch.randn(shape_up, generator=generator) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(float(TINY_LORA_RANK))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".building-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"tiny": "random-weight Lightning stand-in"})
    os.replace(tmp, path)  # atomic: a racing builder writes the same seeded values
    return path


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def _tokenizer() -> Any:
    """Byte-level BPE with Qwen2's split regex, trained on a few lines (gotchas 6, 8)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # tokenizers 0.23 needs tuples (gotcha 8); the annotation says list[str]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)  # type: ignore[arg-type]
    tok.add_tokens([AddedToken(t, special=True) for t in _SPECIAL_TOKENS])
    return tok


def _check_prompt_prefix(pipe: Any) -> None:
    """Gotcha 7: the pipeline drops its first `prompt_template_encode_start_idx` (64)
    tokens as the system prefix; with another count it would eat prompt tokens or keep
    system ones. Checked on the pipeline's own template with a sample prompt."""
    tokenizer, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    template: str = pipe.prompt_template_encode
    user_turn = "<|im_start|>user\n"
    prefix = template[: template.index(user_turn) + len(user_turn)]
    full_ids = tokenizer(template.format("make the sky blue"))["input_ids"]
    prefix_ids = tokenizer(prefix)["input_ids"]
    if len(prefix_ids) != drop or full_ids[:drop] != prefix_ids:
        raise AssertionError(
            f"tiny tokenizer: {type(pipe).__name__}'s system prefix is {len(prefix_ids)} "
            f"tokens but the pipeline drops {drop}; retune _CORPUS or _BPE_VOCAB"
        )


def _processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    side = 56 * 56  # every image becomes a 4x4 patch grid, i.e. 4 <|image_pad|> tokens
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=side, max_pixels=side
    )
    return Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer, **_video_processor()
    )


def _video_processor() -> dict[str, Any]:
    """With torchvision, transformers loads the processor's `video_processor` too and
    fails on a folder without its config: save one (the pipelines never feed videos)."""
    if not _torchvision_usable():
        return {}
    from transformers import Qwen2VLVideoProcessor

    return {"video_processor": Qwen2VLVideoProcessor()}


def _text_encoder(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                "rope_theta": 1e6},
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
            "out_hidden_size": 16, "patch_size": 14, "spatial_merge_size": 2,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]


def _transformer() -> Any:
    from diffusers import QwenImageTransformer2DModel

    # in_channels = 4 * z_dim, out_channels = z_dim, sum(axes) = head dim (gotcha 5)
    return QwenImageTransformer2DModel(  # type: ignore[no-untyped-call]
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip


def _vae() -> Any:
    from diffusers import AutoencoderKLQwenImage

    # 3 temporal-downsample entries: scale factor 8 like the real VAE (gotcha 4)
    return AutoencoderKLQwenImage(  # type: ignore[no-untyped-call]
        base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
        use_dynamic_shifting=True,
    )  # fmt: skip


def _mark(folder: Path, variant: str) -> None:
    (folder / MARKER_FILE).write_text(
        "Random-weight TINY Qwen-Image-Edit pipeline for demos and tests; its outputs are "
        f"noise. Built by qwen_image_edit.tiny_model (variant {variant}, seed {SEED}).\n"
    )
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[MARKER_KEY] = True
    index_path.write_text(json.dumps(index, indent=2) + "\n")

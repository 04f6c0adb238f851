"""Does a LoRA fit the diffusion model it is applied to? Decided from safetensors headers.

ComfyUI 0.33 does not fail a prompt whose LoRA does not fit its model: tensor names that
match no weight are logged (`lora key not loaded: ...`, comfy/lora.py `load_lora`) and a
patch of the wrong shape is logged and skipped (`ERROR lora <weight> shape ... is invalid`,
comfy/weight_adapter/lora.py `calculate_weight`); the video comes out as without the LoRA.
`find_misfit` makes the same decisions before the prompt is queued, from the tensor names
and shapes in the two files' headers (no tensor data is read):

- the names a model's weights answer to: the generic part of comfy/lora.py
  `model_lora_keys_unet`, the only part that applies to Wan (`diffusion_model.<weight>`
  and kohya's `lora_unet_<weight, '.' as '_'>`, both without `.weight`; other tensors by
  their full name), after the loader's prefix handling (comfy/sd.py
  `load_diffusion_model_state_dict`, `model_detection.unet_prefix_from_state_dict`);
- the LoRA tensors each of those names takes: `load_lora` with every weight adapter of
  comfy/weight_adapter (LoRA's seven up/down spellings, LoHa, LoKr, GLoRA, OFT/BOFT) and
  `.alpha`, `.dora_scale`, `.diff`, `.diff_b`, `.set_weight`, `.w_norm`, `.b_norm`, after
  comfy/lora_convert.py `convert_lora`'s one Wan rename (Wan Fun: `lora_unet__` →
  `lora_unet_`); a tensor taken by no name is one ComfyUI would not load;
- shapes, where they decide: up @ down must make the weight's shape (ComfyUI reshapes the
  product, so it needs only the element count; we also refuse a transposed pair), `.diff`,
  `.set_weight` and `.w_norm` the weight's shape, `.diff_b` and `.b_norm` its bias's.
  LoHa, LoKr, GLoRA and OFT are matched by name only: their shape faults show in
  ComfyUI's log during the job (model_service.comfy.lora_log).

A model's table is cached per file (path, size, mtime): a 14B model's header is read once.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model_service.errors import LoraInvalid
from model_service.logs import get_logger

log = get_logger("model_service.lora_fit")

Shape = tuple[int, ...]

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_MODEL = "diffusion_model."
_WEIGHT = ".weight"
# comfy/weight_adapter/lora.py LoRAAdapter.load: (up, down) spellings, the first present wins
_UP_DOWN = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
_LOKR = tuple(f".lokr_{n}" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2"))
_LOHA = tuple(f".hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
_GLORA = (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")


def read_shapes(path: Path) -> dict[str, Shape]:
    """Tensor name → shape, in the file's order, from a safetensors header.

    Raises `ValueError` when the file does not start with one."""
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= length <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file")
        raw = f.read(length)
    header = json.loads(raw)  # a ValueError when truncated or not JSON
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file")
    shapes: dict[str, Shape] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{path.name}: tensor {name!r} has no valid shape")
        shapes[name] = tuple(shape)
    return shapes


# --- the model's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelWeights:
    """A diffusion model as a LoRA sees it in ComfyUI."""

    shapes: dict[str, Shape]  # state-dict name ("diffusion_model.blocks.0.ffn.0.weight")
    names: dict[str, str]  # a LoRA's name for a weight (no suffix) → the state-dict name


def model_weights(path: Path) -> ModelWeights:
    """The table of a diffusion-model file, cached while its size and mtime stay."""
    stat = path.stat()
    return _model_weights(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _model_weights(path: str, size: int, mtime_ns: int) -> ModelWeights:
    return weights_from_shapes(read_shapes(Path(path)))


def weights_from_shapes(file_shapes: Mapping[str, Shape]) -> ModelWeights:
    shapes = {_MODEL + k: v for k, v in _strip_prefix(file_shapes).items()}
    names: dict[str, str] = {}
    for key in shapes:  # comfy/lora.py model_lora_keys_unet, its generic part
        if key.endswith(_WEIGHT):
            bare = key[: -len(_WEIGHT)]
            names["lora_unet_" + bare[len(_MODEL) :].replace(".", "_")] = key
            names[bare] = key
        else:
            names[key] = key
    return ModelWeights(shapes, names)


def _strip_prefix(shapes: Mapping[str, Shape]) -> Mapping[str, Shape]:
    """A checkpoint's `model.diffusion_model.` (or similar) prefix off, as ComfyUI's
    `unet_prefix_from_state_dict` + `state_dict_prefix_replace(filter_keys=True)` do."""
    candidates = ("model.diffusion_model.", "model.model.", "net.")
    counts = {c: sum(1 for k in shapes if k.startswith(c)) for c in candidates}
    top = max(counts, key=lambda c: counts[c])
    prefix = top if counts[top] > 5 else "model."
    stripped = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    return stripped or shapes


# --- the LoRA's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Misfit:
    """Why a LoRA does not fit: `key` is the LoRA tensor named first in `problem`."""

    key: str
    problem: str
    details: dict[str, object] = field(default_factory=dict)


def convert_names(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """comfy/lora_convert.py `convert_lora`, the part that concerns Wan (Wan Fun LoRAs)."""
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in shapes:
        return {_replace_prefix(k, "lora_unet__", "lora_unet_"): v for k, v in shapes.items()}
    return dict(shapes)


def _replace_prefix(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old) else key


@dataclass(frozen=True)
class Match:
    """What ComfyUI would make of a LoRA on a model."""

    tensors: dict[str, Shape]  # the LoRA's tensors, renamed as ComfyUI renames them
    unmatched: list[str]  # those it would not load ("lora key not loaded"), in file order
    wrong: list[Misfit]  # patches it would not apply (shape, or no such weight), in order


def match(lora: Mapping[str, Shape], model: ModelWeights) -> Match:
    tensors = convert_names(lora)
    taken: set[str] = set()
    wrong: list[Misfit] = []
    for name, weight in model.names.items():
        wrong.extend(_take(name, weight, tensors, model.shapes, taken))
    order = {key: index for index, key in enumerate(tensors)}
    wrong.sort(key=lambda m: order.get(m.key, len(order)))
    return Match(tensors, [key for key in tensors if key not in taken], wrong)


def find_misfit(lora: Mapping[str, Shape], model: ModelWeights) -> Misfit | None:
    """The first reason ComfyUI would not apply all of `lora` to `model`, or None.

    A wrong shape is reported before a name that matches nothing; "first" is in the
    LoRA file's order."""
    found = match(lora, model)
    if found.wrong:
        return found.wrong[0]
    tensors, unmatched = found.tensors, found.unmatched
    if not unmatched:
        return None
    first, count = unmatched[0], len(unmatched)
    if count == len(tensors):
        problem = f"none of its {count} tensors matches a layer of the model (the first: {first!r})"
    else:
        problem = (
            f"{count} of its {len(tensors)} tensors match no layer of the model "
            f"(the first: {first!r})"
        )
    return Misfit(first, problem, {"unmatched": count, "tensors": len(tensors)})


def _take(
    x: str, weight: str, lora: Mapping[str, Shape], shapes: Mapping[str, Shape], taken: set[str]
) -> Iterator[Misfit]:
    """comfy/lora.py `load_lora` for one name `x` of `weight`: marks the LoRA tensors it
    takes and yields the shape problems among them."""
    for suffix in (".alpha", ".dora_scale"):
        taken.update(_present(lora, x, suffix))
    target = shapes[weight]
    for up_suffix, down_suffix in _UP_DOWN:
        up, down = x + up_suffix, x + down_suffix
        if up not in lora:
            continue
        taken.update((up, down))
        extra = _present(lora, x, ".reshape_weight")
        mid = _present(lora, x, ".lora_mid.weight") if up_suffix == ".lora_up.weight" else []
        taken.update(extra + mid)
        if down not in lora:
            yield Misfit(up, f"it has {up!r} but no {down!r}", {"model_key": weight})
        elif not (extra or mid):  # a reshape or a LoCon middle: ComfyUI's own arithmetic
            yield from _up_down_misfit(up, down, lora[up], lora[down], weight, target)
        break
    if x + ".hada_w1_a" in lora:  # LoHa
        taken.update(_present(lora, x, *_LOHA))
        if x + ".hada_t1" in lora:
            taken.update(_present(lora, x, ".hada_t1", ".hada_t2"))
    taken.update(_present(lora, x, *_LOKR))
    if x + ".a1.weight" in lora:  # GLoRA
        taken.update(_present(lora, x, *_GLORA))
    if len(lora.get(x + ".oft_blocks", ())) in (3, 4):  # OFT (3-d blocks), BOFT (4-d)
        taken.update(_present(lora, x, ".oft_blocks", ".rescale"))
    bias = weight[: -len(_WEIGHT)] + ".bias" if weight.endswith(_WEIGHT) else None
    whole = [".diff", ".set_weight"]
    if x + ".w_norm" in lora:
        whole.append(".w_norm")
        if x + ".b_norm" in lora:
            yield from _same_shape(x + ".b_norm", lora, bias, shapes, taken)
    for suffix in whole:
        if x + suffix in lora:
            yield from _same_shape(x + suffix, lora, weight, shapes, taken)
    if x + ".diff_b" in lora:
        yield from _same_shape(x + ".diff_b", lora, bias, shapes, taken)


def _present(lora: Mapping[str, Shape], x: str, *suffixes: str) -> list[str]:
    return [x + s for s in suffixes if x + s in lora]


def _same_shape(
    key: str,
    lora: Mapping[str, Shape],
    target: str | None,
    shapes: Mapping[str, Shape],
    taken: set[str],
) -> Iterator[Misfit]:
    """A tensor that replaces or is added to `target` whole (`diff`, `set_weight`, ...)."""
    taken.add(key)
    if target is None or target not in shapes:  # comfy/sd.py: "NOT LOADED <key>"
        yield Misfit(
            key,
            f"{key!r} is for a tensor the model does not have ({target!r})",
            {"model_key": target},
        )
    elif lora[key] != shapes[target]:
        yield Misfit(
            key,
            f"{key!r} is {_dims(lora[key])} but the model's {target!r} is {_dims(shapes[target])}",
            {
                "lora_shape": list(lora[key]),
                "model_shape": list(shapes[target]),
                "model_key": target,
            },
        )


def _up_down_misfit(
    up: str, down: str, up_shape: Shape, down_shape: Shape, weight: str, target: Shape
) -> Iterator[Misfit]:
    """ComfyUI: `(up.flatten(1) @ down.flatten(1)).reshape(weight.shape)`."""
    if len(up_shape) < 2 or len(down_shape) < 2 or math.prod(up_shape[1:]) != down_shape[0]:
        yield Misfit(
            up,
            f"{up!r} {_dims(up_shape)} and {down!r} {_dims(down_shape)} do not share a rank",
            {"lora_shape": [list(up_shape), list(down_shape)], "model_key": weight},
        )
        return
    made = (up_shape[0], *down_shape[1:])
    if not target or up_shape[0] != target[0] or math.prod(made[1:]) != math.prod(target[1:]):
        yield Misfit(
            up,
            f"{up!r} {_dims(up_shape)} and {down!r} {_dims(down_shape)} make a "
            f"{_dims(made)} update, but the model's {weight!r} is {_dims(target)}",
            {"lora_shape": list(made), "model_shape": list(target), "model_key": weight},
        )


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- the check a job makes --------------------------------------------------------------------


def check_lora_fit(
    lora: Path, models: Sequence[Path], *, field: str, source: str, base: str
) -> None:
    """Raises `LoraInvalid` (naming `field`) when the LoRA at `lora` does not fit one of
    the diffusion-model files `models` it is applied to. `base` names the model family
    for the advice ("Wan2.2 A14B"). A model file without a readable header (absent, or a
    placeholder) is not checked: ComfyUI has to load it first and fails on its own."""
    try:
        lora_shapes = read_shapes(lora)
    except (OSError, ValueError) as exc:
        raise LoraInvalid(
            f"{field}: LoRA {source} cannot be read ({exc}); give a safetensors LoRA file",
            field=field,
            source=source,
        ) from None
    for path in models:
        try:
            model = model_weights(path)
        except (OSError, ValueError) as exc:
            log.warning(
                "LoRA fit not checked: the model file is unreadable",
                model=str(path),
                error=str(exc),
            )
            continue
        misfit = find_misfit(lora_shapes, model)
        if misfit is not None:
            raise LoraInvalid(
                f"{field}: LoRA {source} does not fit the model {path.name}: {misfit.problem}; "
                f"this LoRA is for another model size or architecture: use one trained for "
                f"{base}",
                field=field,
                source=source,
                model_file=path.name,
                key=misfit.key,
                **misfit.details,
            )

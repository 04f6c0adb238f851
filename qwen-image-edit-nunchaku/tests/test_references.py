"""Reference images: how strength scales what the model gets, how the prompt is
completed, and the input's checks (pure code; the pipeline and HTTP are in
test_pipeline.py and test_service.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from model_service.errors import InvalidInput
from model_service.settings import Settings
from qwen_image_edit import references
from qwen_image_edit.schema import QwenEditInput
from qwen_image_edit.service import SPEC


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_strength_scales_the_contrast_around_mid_grey(strength: float) -> None:
    values = np.array([[[0, 128, 255], [40, 200, 90]]], dtype=np.uint8)
    scaled = np.asarray(references.scaled(Image.fromarray(values), strength), dtype=np.int32)
    expected = np.round(128 + strength * (values.astype(np.int32) - 128))
    assert (scaled == expected).all()


def test_the_prompt_is_completed_by_role_naming_each_picture() -> None:
    refs = [references.Reference("a.png", "style"), references.Reference("b.png", "scene")]
    prompt = references.completed_prompt(" make it autumn ", refs, first_picture=2)
    assert prompt == (
        "make it autumn "
        + references.TEMPLATES["style"].format(n=2)
        + " "
        + references.TEMPLATES["scene"].format(n=3)
    )
    assert "Picture 2" in prompt
    assert "Picture 3" in prompt


def test_references_of_the_input_default_to_full_strength() -> None:
    refs = references.of_inputs(
        {"references": ["/r/0.png", "/r/1.png"], "reference_roles": ["subject", "style"]}
    )
    assert refs == [
        references.Reference("/r/0.png", "subject", 1.0),
        references.Reference("/r/1.png", "style", 1.0),
    ]
    assert references.of_inputs({"prompt": "x"}) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"references": ["upl_r"]}, "reference_roles"),
        ({"references": ["upl_r"], "reference_roles": ["style", "scene"]}, "reference_roles"),
        (
            {"references": ["upl_r"], "reference_roles": ["style"], "reference_strengths": []},
            "reference_strengths",
        ),
        ({"references": ["upl_r"], "reference_roles": ["mood"]}, "reference_roles"),
        (
            {"references": ["upl_r"], "reference_roles": ["style"], "reference_strengths": [2]},
            "reference_strengths",
        ),
        (
            {"images": ["a", "b"], "references": ["r", "s"], "reference_roles": ["style"] * 2},
            "at most 3",
        ),
    ],
)
def test_bad_references_are_refused(fields: dict[str, object], message: str) -> None:
    base = {"prompt": "x"} | ({} if "images" in fields else {"image": "upl_a"})
    with pytest.raises(ValidationError, match=message):
        QwenEditInput.model_validate(base | fields)


def test_the_first_edit_model_takes_no_reference() -> None:
    data = QwenEditInput(image="upl_a", prompt="x", references=["upl_r"], reference_roles=["style"])
    with pytest.raises(InvalidInput, match="input.references"):
        SPEC.check_input(data, Settings(model_variant="edit"))
    SPEC.check_input(data, Settings(model_variant="edit-2509"))

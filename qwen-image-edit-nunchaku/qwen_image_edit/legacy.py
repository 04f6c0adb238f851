"""Routes of the original Qwen-Image-Edit service (legacy), mapped onto the job engine.

Kept so that clients of the original `POST /edit-image`, `POST /batch-edit-image` and
`GET /model-info` keep working. Each edit is a normal job (visible in /v1/jobs); the
route waits for it (at most 90 s) and answers in the original shape. Differences from
the original: bad input is a 422 with the standard error body (never a 200), and a
job that is still running after 90 s answers 202 with its id to poll at /v1/jobs.
New clients should use /v1/jobs.
"""

import asyncio
import base64
import io
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from model_service.api.jobs import MAX_WAIT_S, wait_until_terminal
from model_service.api.state import ServiceState
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from qwen_image_edit.manifest import parse_model_variant

# The original service defaulted to 8 steps at cfg 1 because it loaded the 8-step
# Lightning weights (svdq-int4_r128-qwen-image-edit-lightningv1.0-8steps). Here absent
# values take the /v1/jobs defaults, which follow the loaded weights: with Lightning
# (MODEL_VARIANT=...-lightning-4|8) its steps at true_cfg_scale 1 (ModelTC/Qwen-Image-
# Lightning README); with the base model 40 (2509, 2511) or 50 (Edit) steps at
# true_cfg_scale 4 (QwenLM/Qwen-Image README, nunchaku examples).


class EditImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(..., description="base64, data URL, https URL or upload id")
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None  # absent: the loaded model's own (see below)
    true_cfg_scale: float | None = None
    seed: int | None = None


class BatchEditRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    images: list[str] = Field(..., min_length=1, max_length=16)
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None  # absent: the loaded model's own (see below)
    true_cfg_scale: float | None = None
    seed: int | None = None


def _job_input(image: str, request: EditImageRequest | BatchEditRequest) -> dict[str, Any]:
    # The original accepted bare base64; make it a data URI.
    if not image.startswith(("data:", "http://", "https://", "upl_")):
        image = "data:image/png;base64," + image
    # The job engine validates this as QwenEditInput (a 422 naming the field if wrong).
    values: dict[str, Any] = {
        "image": image,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or " ",
        "steps": request.num_inference_steps,
        "seed": request.seed,
        "output_format": "jpeg",
    }
    if request.true_cfg_scale is not None:
        values["true_cfg_scale"] = request.true_cfg_scale
    return values


def _result(state: ServiceState, job: Job) -> dict[str, Any]:
    elapsed = (job.finished_at or 0) - job.created_at
    inference = (job.finished_at or 0) - (job.started_at or job.created_at)
    body: dict[str, Any] = {
        "success": job.status is JobStatus.SUCCEEDED,
        "request_id": job.id,
        "processing_time": round(elapsed, 3),
        "model_info": {
            "steps": job.prepared_input.get("steps") or job.info.get("steps"),
            "model_version": state.runner.worker_info.get("variant"),
            "inference_time": round(inference, 3),
            "seed": job.seed,
        },
    }
    if job.status is JobStatus.SUCCEEDED:
        path = state.settings.job_dir(job.id) / "outputs" / job.outputs[0]
        body["edited_image"] = _jpeg_base64(path.read_bytes())
    else:
        body["error_message"] = (job.error or {}).get("message", f"job {job.status}")
        body["error_code"] = (job.error or {}).get("code", job.status.value)
    return body


def _jpeg_base64(data: bytes) -> str:
    image = Image.open(io.BytesIO(data))
    if image.format != "JPEG":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
    return base64.b64encode(data).decode()


def routers(state: ServiceState) -> list[APIRouter]:
    router = APIRouter(tags=["legacy"])

    async def run_one(request: Request, image: str, body: Any) -> Job:
        job, _ = await state.submitter.submit(
            _job_input(image, body),
            job_id=None,
            webhook=None,
            webhook_events=None,
            base_url=state.base_url(request),
        )
        return job

    @router.post("/edit-image", summary="Legacy: edit one image and wait (use /v1/jobs)")
    async def edit_image(request: Request, body: EditImageRequest) -> JSONResponse:
        job = await run_one(request, body.image, body)
        job = await wait_until_terminal(state, job, MAX_WAIT_S)
        if not job.status.is_terminal:
            return JSONResponse(
                {"success": False, "request_id": job.id, "status": job.status.value}, 202
            )
        return JSONResponse(_result(state, job))

    @router.post("/batch-edit-image", summary="Legacy: edit several images (use /v1/jobs)")
    async def batch_edit(request: Request, body: BatchEditRequest) -> JSONResponse:
        jobs = [await run_one(request, image, body) for image in body.images]
        finished = await asyncio.gather(
            *(wait_until_terminal(state, job, MAX_WAIT_S) for job in jobs)
        )
        results = [_result(state, job) for job in finished]
        succeeded = sum(1 for result in results if result["success"])
        return JSONResponse(
            {
                "success": succeeded == len(results),
                "results": results,
                "total_processing_time": round(sum(r["processing_time"] for r in results), 3),
                "processed_count": succeeded,
                "failed_count": len(results) - succeeded,
            }
        )

    @router.get("/model-info", summary="Legacy: what model is loaded")
    async def model_info() -> dict[str, Any]:
        choice = parse_model_variant(state.settings.model_variant)
        info = state.runner.worker_info
        return {
            "model_name": choice.variant.hf_repo,
            "model_version": choice.name,
            # the loaded worker's (the tiny profile's differ), else the weights' own
            "default_steps": info.get("default_steps", choice.default_steps),
            "default_true_cfg_scale": info.get(
                "default_true_cfg_scale", choice.default_true_cfg_scale
            ),
            "max_steps": 100,
            "max_input_images": choice.variant.max_input_images,
            "profile": state.settings.profile,
            "model_config": info,
        }

    return [router]

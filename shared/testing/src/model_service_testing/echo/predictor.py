"""Worker side of the echo service. Each `behaviour` is one failure mode."""

import os
import signal
import time
from typing import Any

from PIL import Image, ImageOps

from model_service.predictor import JobContext, PredictResult, SetupResult, WorkerConfig
from model_service_testing.echo.version import EchoVersion


def _log_run(event: str, job_id: str) -> None:
    """ECHO_RUN_LOG: one line per start and end of a run, shared by every process (fleet
    tests count how often each job ran)."""
    path = os.environ.get("ECHO_RUN_LOG")
    if path:
        with open(path, "a") as log:  # one short append: atomic between processes
            log.write(f"{event} {job_id} {os.getpid()}\n")


REFUSED_TEXT = "a word the loaded model refuses"


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker recognises by name."""


class EchoPredictor:
    def setup(self, config: WorkerConfig) -> SetupResult:
        if config.options.get("fail_setup"):
            raise RuntimeError("weights not found at /nowhere")
        time.sleep(float(config.options.get("setup_s", 0)))
        threads = os.environ.get("OMP_NUM_THREADS")
        version = EchoVersion("1.0")  # a library type, as torch.__version__ is
        info = {"model": "echo", "pid": os.getpid(), "omp_threads": threads, "version": version}
        info["refused_text"] = REFUSED_TEXT  # the loaded model's rule (spec.check_against_model)
        return SetupResult(info=info)

    def predict(self, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
        behaviour = inputs["behaviour"]
        _log_run("start", ctx.job_id)
        for step in range(1, inputs["steps"] + 1):
            if step == 1:
                self._misbehave(behaviour)
            time.sleep(inputs["step_s"])
            ctx.progress(step, inputs["steps"])
        if inputs.get("image"):
            image = ImageOps.invert(Image.open(inputs["image"]).convert("RGB"))
        else:
            image = Image.new("RGB", (8, 8), (ctx.seed % 256, 0, 0))
        image.save(ctx.output_dir / "out.png")
        (ctx.output_dir / "text.txt").write_text(inputs["text"])
        _log_run("end", ctx.job_id)
        return PredictResult(outputs=["out.png", "text.txt"], info={"seed_seen": ctx.seed})

    @staticmethod
    def _misbehave(behaviour: str) -> None:
        if behaviour == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if behaviour == "kill_pod":  # the whole service dies (the OOM killer, a node loss)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if behaviour == "exit":
            os._exit(3)
        if behaviour == "hang":  # never reports progress: only a kill stops it
            time.sleep(3600)
        if behaviour == "error":
            raise ValueError("bad weights for this prompt")
        if behaviour == "oom":
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if behaviour == "cuda_error":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

"""A predictor with all three pipeline stages, each slow and timed (worker pipeline tests).

Inputs: `prepare_s`, `predict_s`, `finish_s` (how long each stage sleeps) and `fail`
(the stage that raises, or "crash": the process dies in `predict`). Each stage records
when it ran (this process's `time.time()`, as `JobStarted.at`) in the job's info:
`{"prepare": [start, end], "predict": [...], "finish": [...]}`.
"""

import os
import signal
import time
from typing import Any

from model_service.predictor import JobContext, PredictResult, SetupResult, WorkerConfig

PREDICT_STEPS = 5


class PipelinePredictor:
    def setup(self, config: WorkerConfig) -> SetupResult:
        return SetupResult(info={"pid": os.getpid()})

    def prepare(self, inputs: dict[str, Any]) -> dict[str, Any]:
        started = time.time()
        time.sleep(inputs["prepare_s"])
        if inputs.get("fail") == "prepare":
            raise ValueError("cannot decode the input file")
        return inputs | {"timings": {"prepare": [started, time.time()]}}

    def predict(self, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
        started = time.time()
        if inputs.get("fail") == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        for step in range(1, PREDICT_STEPS + 1):  # cancel stops it at the next step
            time.sleep(inputs["predict_s"] / PREDICT_STEPS)
            ctx.progress(step, PREDICT_STEPS)
        timings = inputs["timings"] | {"predict": [started, time.time()]}

        def finish() -> None:  # fills the info's timings before the JobDone is sent
            finish_started = time.time()
            time.sleep(inputs["finish_s"])
            if inputs.get("fail") == "finish":
                raise OSError("no space left on device")
            (ctx.output_dir / "out.txt").write_text(ctx.job_id)
            timings["finish"] = [finish_started, time.time()]

        return PredictResult(outputs=["out.txt"], info={"timings": timings}, finish=finish)

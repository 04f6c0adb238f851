"""`make demo`: start the Qwen-Image-Edit service (tiny profile, no GPU, no download),
send a real edit job over HTTP, follow its progress, and save the edited image."""

import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from model_service_testing.process import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "demo"


def input_image() -> bytes:
    image = Image.new("RGB", (96, 64), (30, 60, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((28, 12, 68, 52), fill=(240, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(
        "model_service.cli",
        WORK / "data",
        env={"PROFILE": "tiny", "MODELS_DIR": str(WORK / "models"), "LOG_FORMAT": "json"},
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    print(f"starting qwen-image-edit-nunchaku (PROFILE=tiny) on {service.url} ...")
    service.start(timeout=300)
    try:
        with service.client() as client:
            print("ready:", client.get("/v1/service").json()["model"]["reason"])
            upload = client.post("/v1/uploads", files={"file": ("in.png", input_image())})
            upload.raise_for_status()
            job = client.post(
                "/v1/jobs",
                json={
                    "input": {
                        "image": upload.json()["id"],
                        "prompt": "make the sun red",
                        "width": 96,
                        "height": 64,
                        "steps": 4,
                    }
                },
            ).json()
            print(f"job {job['id']} {job['status']} (seed {job['seed']})")
            with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                for line in events.iter_lines():
                    if line.startswith("data: "):
                        view = json.loads(line[6:])
                        progress = view["progress"]
                        print(f"  {view['status']:<9} step {progress['step']}/{progress['total']}")
            job = client.get(f"/v1/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                print("job did not succeed:", job["error"], file=sys.stderr)
                return 1
            output = job["outputs"][0]
            target = WORK / f"edited-{output['name']}"
            target.write_bytes(client.get(output["url"]).content)
            print(f"edited image ({Image.open(target).size[0]}x{Image.open(target).size[1]}):")
            print(f"  {target}")
    finally:
        service.stop()
    print(f"service log: {service.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

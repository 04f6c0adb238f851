"""`msc` (typer's CliRunner, in process) against the real echo service."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from client_testing import KEY, fetch, pixel, png_bytes
from model_service_client import Client
from model_service_client.cli import app
from model_service_testing.process import ServiceProcess

runner = CliRunner()


def msc(service: ServiceProcess, *args: str, key: str | None = KEY) -> tuple[int, str, str]:
    options = ["--url", service.url, *(["--key", key] if key else [])]
    result = runner.invoke(app, [*options, *args])
    return result.exit_code, result.stdout, result.stderr


def test_submit_wait_get_and_download(service: ServiceProcess, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((255, 0, 0)))
    code, out, err = msc(
        service, "submit", '{"text": "cli", "steps": 3}', "--file", f"image={image}", "--wait"
    )
    assert code == 0, err
    job = json.loads(out)  # stdout is the job's JSON alone
    assert job["status"] == "succeeded"
    assert job["input"]["image"].startswith("upl_")
    code, out, err = msc(service, "get", job["id"])
    assert code == 0, err
    assert json.loads(out)["id"] == job["id"]
    code, out, err = msc(service, "download", job["id"], "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = [Path(line) for line in out.splitlines()]
    assert sorted(p.name for p in written) == ["out.png", "text.txt"]
    urls = {o["name"]: o["url"] for o in job["outputs"]}
    for path in written:
        assert path.read_bytes() == fetch(urls[path.name])
    assert pixel((tmp_path / "out" / "out.png").read_bytes()) == (0, 255, 255)
    code, out, err = msc(service, "submit", '{"text": "own id"}', "--id", "cli-own-id")
    assert code == 0, err
    assert json.loads(out)["id"] == "cli-own-id"
    code, out, err = msc(service, "wait", "cli-own-id")
    assert code == 0, err
    assert json.loads(out)["status"] == "succeeded"


def test_list_cancel_and_retry(service: ServiceProcess) -> None:
    with Client(service.url, KEY) as client:
        newest = [client.submit({"text": str(i)}, wait_s=30).id for i in range(3)]
        long = client.submit({"steps": 200, "step_s": 0.05})
        failed = client.submit({"behaviour": "error"})
    code, out, err = msc(service, "list", "--status", "succeeded", "--limit", "2")
    assert code == 0, err
    assert newest[2] in out
    assert newest[1] in out
    assert newest[0] not in out  # on the next page
    assert "more: --cursor " in out
    cursor = out.rsplit("--cursor ", 1)[1].split()[0]
    code, out, err = msc(
        service, "list", "--status", "succeeded", "--limit", "2", "--cursor", cursor
    )
    assert code == 0, err
    assert newest[0] in out
    code, out, err = msc(service, "cancel", long.id)
    assert code == 0, err
    assert out.startswith(f"{long.id}: ")
    assert "canceled" in out or "cancel requested" in out
    code, out, err = msc(service, "wait", long.id)  # canceled: exit 1
    assert code == 1
    assert f"job {long.id} was canceled" in err
    code, out, err = msc(service, "wait", failed.id)  # failed: its code, exit 1
    assert code == 1
    assert json.loads(out)["status"] == "failed"
    assert "model_error" in err
    code, out, err = msc(service, "retry", failed.id)
    assert code == 0, err
    assert out.strip() == f"{failed.id}: queued"


def test_errors_are_one_line_and_exit_1(service: ServiceProcess) -> None:
    code, out, err = msc(service, "submit", '{"steps": 0}')
    assert code == 1
    assert out == ""
    assert err.startswith("error: invalid_input (HTTP 422): invalid request: input.steps")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    code, _out, err = msc(service, "get", "no-such-job")
    assert (code, err.split(":")[1].strip()) == (1, "not_found (HTTP 404)")
    code, _out, err = msc(service, "list", key=None)
    assert code == 1
    assert "unauthorized (HTTP 401)" in err
    code, _out, err = msc(service, "submit", "not json")
    assert code == 1
    assert "not JSON" in err
    code, _out, err = msc(service, "submit", "{}", "--file", "image=/no/such/file.png")
    assert (code, "no such file" in err) == (1, True)


def test_msc_console_script(service: ServiceProcess) -> None:
    """The installed entry point, environment variables for the URL and key."""
    script = Path(sys.executable).with_name("msc")
    env = {"MODEL_SERVICE_URL": service.url, "MODEL_SERVICE_API_KEY": KEY, "PATH": ""}
    done = subprocess.run(
        [str(script), "submit", '{"text": "script"}', "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input"]["text"] == "script"
    refused = subprocess.run(
        [str(script), "--key", "wrong", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: unauthorized (HTTP 401): ")
    assert "Traceback" not in refused.stderr


def test_msc_logs_prints_a_failed_jobs_lines(service: ServiceProcess) -> None:
    with Client(service.url, KEY) as client:
        failed = client.submit({"behaviour": "error"}, wait_s=30)
        assert failed.status == "failed"
        assert client.logs(failed.id)["complete"] is True
    code, out, err = msc(service, "logs", failed.id)
    assert code == 0, err
    lines = out.splitlines()
    assert any("model_service.worker" in line and "job failed" in line for line in lines), out
    assert any("job finished status=failed" in line for line in lines), out
    assert err == ""
    code, _out, err = msc(service, "logs", "no-such-job")
    assert code == 1
    assert "not_found" in err

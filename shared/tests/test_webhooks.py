"""Webhooks to a real local receiver, verified with the standardwebhooks library."""

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook

from model_service_testing.process import free_port, wait_status
from model_service_testing.webhooks import SECRET, Receiver

ENV = {
    "FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
    "WEBHOOK_SECRET": SECRET,
    "WEBHOOK_RETRY_BASE_S": "0.2",
}


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(port: int | None = None, fail_first: int = 0, answer_after_s: float = 0.0) -> Receiver:
        made.append(Receiver(port or free_port(), fail_first, answer_after_s))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_webhook_is_signed_and_filtered_by_event(echo_service, receiver) -> None:
    hook = receiver(fail_first=2)
    service = echo_service(env=ENV)
    with service.client() as client:
        body = {"input": {}, "webhook": hook.url, "webhook_events": ["running", "succeeded"]}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        payloads = hook.wait(2)
    # retries can reorder deliveries (as Standard Webhooks allows): match by type
    assert sorted(p["type"] for p in payloads) == ["job.running", "job.succeeded"]
    done = next(i for i, p in enumerate(payloads) if p["type"] == "job.succeeded")
    assert payloads[done]["data"]["id"] == job_id
    assert payloads[done]["data"]["outputs"][0]["url"].startswith(service.url)
    headers, body = hook.received[done]
    assert headers["webhook-id"].startswith("msg_")
    tampered = body.replace(b"succeeded", b"failed")
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(SECRET).verify(tampered, headers)


def test_receiver_down_then_up_gets_the_webhook(echo_service, receiver) -> None:
    port = free_port()
    service = echo_service(env=ENV)
    with service.client() as client:
        url = f"http://127.0.0.1:{port}/hook"
        job_id = client.post("/v1/jobs", json={"input": {}, "webhook": url}).json()["id"]
        wait_status(client, job_id, {"succeeded"})
        time.sleep(0.5)  # at least one attempt fails: nothing listens yet
        hook = receiver(port)
        [payload] = hook.wait(1)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job_id


def test_pending_webhooks_survive_a_restart(echo_service, receiver) -> None:
    port = free_port()
    service = echo_service(env={**ENV, "WEBHOOK_RETRY_BASE_S": "30"})
    with service.client() as client:
        url = f"http://127.0.0.1:{port}/hook"
        job_id = client.post("/v1/jobs", json={"input": {}, "webhook": url}).json()["id"]
        wait_status(client, job_id, {"succeeded"})
        time.sleep(0.3)
    service.kill9()
    hook = receiver(port)
    again = echo_service(env={**ENV, "WEBHOOK_RETRY_BASE_S": "30"}, data_dir=service.data_dir)
    assert again.url != service.url
    # the retry is due in ~30 s; a restart must not drop it. Make it due now:
    import sqlite3

    with sqlite3.connect(service.data_dir / "jobs.sqlite3") as db:
        db.execute("UPDATE webhook_deliveries SET next_attempt_at = 0")
    again.stop()
    again = echo_service(env=ENV, data_dir=service.data_dir)
    [payload] = hook.wait(1)
    assert payload["data"]["id"] == job_id
    assert json.loads(hook.received[0][1])["type"] == "job.succeeded"


def test_unsigned_webhooks_when_no_secret(echo_service, receiver) -> None:
    hook = receiver()
    service = echo_service(env={"FETCH_ALLOW_NETWORKS": "127.0.0.1/32"})
    with service.client() as client:
        client.post("/v1/jobs", json={"input": {}, "webhook": hook.url})
        deadline = time.monotonic() + 20
        while not hook.received:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    headers, body = hook.received[0]
    assert "webhook-signature" not in {key.lower() for key in headers}
    assert json.loads(body)["type"] == "job.succeeded"


def test_a_hanging_receiver_delays_only_its_own_webhooks(echo_service, receiver) -> None:
    """Issue 24: deliveries went out one at a time, so one receiver that does not answer
    held back every other job's webhooks for its whole timeout, each."""
    hanging = receiver(answer_after_s=300)
    prompt = receiver()
    service = echo_service(env={**ENV, "WEBHOOK_TIMEOUT_S": "120"})
    with service.client() as client:
        for _ in range(6):  # more than the receiver's share of the senders
            client.post("/v1/jobs", json={"input": {}, "webhook": hanging.url})
        hanging.wait_arrived(1)
        job_ids = [
            client.post("/v1/jobs", json={"input": {}, "webhook": prompt.url}).json()["id"]
            for _ in range(3)
        ]
        payloads = prompt.wait(3, timeout=60)  # long before the hanging ones time out
    assert sorted(p["data"]["id"] for p in payloads) == sorted(job_ids)
    assert hanging.arrived <= 4, "at most PER_RECEIVER at once to one receiver"

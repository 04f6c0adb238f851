"""No secret reaches the logs: not through a 500's traceback (the frames' locals held the
request's Authorization header and the settings), nor a store error, nor anything that
logs a header or a known secret by mistake (the redactor)."""

import http.client
import json
import sqlite3

import pytest

from model_service.logs import REDACTED, Redactor
from model_service.settings import Settings
from model_service.weights import Tokens

KEY = "key-8f3a1c-do-not-log"
OTHER_KEY = "key-77aa9e-nor-this"
WEBHOOK_SECRET = "whsec_c2VjcmV0LXNpZ25pbmctc2VjcmV0"
HF_TOKEN = "hf_tokenvalue0123456789"
CIVITAI_TOKEN = "civitai-0a1b2c3d4e5f-key"
SECRETS = (
    KEY,
    OTHER_KEY,
    WEBHOOK_SECRET,
    HF_TOKEN,
    CIVITAI_TOKEN,
    "c2VjcmV0LXNpZ25pbmctc2VjcmV0",
)
SECRET_ENV = {
    "API_KEYS": f"{KEY},{OTHER_KEY}",
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    "HF_TOKEN": HF_TOKEN,
    "CIVITAI_TOKEN": CIVITAI_TOKEN,
}


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict]:
    conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}", "Cookie": "sid=abc1"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_a_500_logs_its_traceback_without_secrets_and_keeps_the_connection(echo_service):
    service = echo_service(env=SECRET_ENV)
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    status, body = get(conn, "/echo/fault")
    assert status == 500
    assert body["error"]["code"] == "internal_error"
    socket_before = conn.sock
    status, body = get(conn, "/echo/fault")  # the same connection: kept alive
    assert status == 500
    assert conn.sock is socket_before
    assert get(conn, "/v1/jobs")[0] == 200
    conn.close()
    service.stop()
    log = service.log()
    for secret in SECRETS:
        assert secret not in log
    assert "sid=abc1" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    faults = [line for line in lines if line["event"] == "unhandled error"]
    assert len(faults) == 2  # logged once each, by us; not again by the server
    assert "a bug on purpose" in json.dumps(faults[0]["exception"])
    assert "Exception in ASGI application" not in log


def test_a_store_error_logs_no_secret(echo_service):
    service = echo_service(env=SECRET_ENV)
    service.headers = {"Authorization": f"Bearer {KEY}"}
    with service.client() as client:
        assert client.post("/v1/jobs", json={"input": {}}).status_code == 202
        lock = sqlite3.connect(service.data_dir / "jobs.sqlite3", check_same_thread=False)
        lock.execute("BEGIN EXCLUSIVE")  # what `sqlite3 jobs.sqlite3 'BEGIN EXCLUSIVE'` holds
        try:
            response = client.post("/v1/jobs", json={"input": {}})
        finally:
            lock.rollback()
            lock.close()
        assert response.status_code >= 500, response.text
    service.stop()
    log = service.log()
    for secret in SECRETS:
        assert secret not in log


def test_secret_settings_are_not_shown() -> None:
    settings = Settings(
        api_keys=f"{KEY},{OTHER_KEY}", webhook_secret=WEBHOOK_SECRET, civitai_token=CIVITAI_TOKEN
    )
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert KEY not in shown
        assert WEBHOOK_SECRET not in shown
        assert CIVITAI_TOKEN not in shown
    assert KEY in settings.secret_values()
    assert WEBHOOK_SECRET in settings.secret_values()
    assert CIVITAI_TOKEN in settings.secret_values()  # the redactor hides it in every line


def test_weight_tokens_are_not_shown_and_go_to_their_own_hosts() -> None:
    tokens = Tokens(hf=HF_TOKEN, civitai=CIVITAI_TOKEN)
    assert HF_TOKEN not in repr(tokens)
    assert CIVITAI_TOKEN not in repr(tokens)
    civitai = {"Authorization": f"Bearer {CIVITAI_TOKEN}"}
    assert tokens.headers_for("https://civitai.com/api/download/models/1") == civitai
    assert tokens.headers_for("https://huggingface.co/o/r/resolve/main/x.safetensors") == {
        "Authorization": f"Bearer {HF_TOKEN}"
    }
    for elsewhere in (
        "https://example.com/x.safetensors",
        "https://civitai.com.evil.example/x",
        "https://notcivitai.com/api/download/models/1",
        "https://b2.civitai-delivery.example/file?sig=1",
    ):
        assert tokens.headers_for(elsewhere) == {}


@pytest.mark.parametrize(
    ("line", "hidden"),
    [
        ("Authorization: Bearer abc.def-123", "abc.def-123"),
        ("(b'authorization', b'Bearer tok-zzz')", "tok-zzz"),
        ("{'cookie': 'sid=123; x=y'}", "sid=123"),
        ('{"Set-Cookie": "sid=456"}', "sid=456"),
        ('"event": "retry with \\"Basic dXNlcjpwYXNz\\""', "dXNlcjpwYXNz"),
        (f"calling with {KEY} now", KEY),
        (json.dumps({"k": 'we"ird-secret'}), 'we\\"ird-secret'),
    ],
)
def test_the_redactor_hides_headers_and_known_secrets(line: str, hidden: str) -> None:
    redacted = Redactor([KEY, 'we"ird-secret']).redact(line)
    assert hidden not in redacted
    assert REDACTED in redacted


def test_the_redactor_leaves_ordinary_text() -> None:
    line = "authorization failed: no key; cookie jar empty; 3 bears"
    assert Redactor(["abc"]).redact(line) == line  # "abc": too short to be redacted

#!/usr/bin/env bash
# Image smoke test: build a service's Dockerfile on a locally made Debian base (no CUDA base
# image, no Docker engine, no GPU), start the image, check /health and run a tiny job.
#
#   scripts/image_smoke.sh <service>        (or: make image-smoke SERVICE=<service>)
#
# Stages (each fails loudly with what went wrong):
#   1. tools   debootstrap, buildah, podman (installed with apt-get when missing and root)
#   2. base    debootstrap bookworm (minbase + python3, python3-venv, ca-certificates),
#              imported as $SMOKE_BASE_IMAGE; skipped when that image exists
#   3. build   buildah bud --isolation chroot of the service's Dockerfile with its build
#              arguments (scripts/services.py: its image.toml), the base passed as BASE_IMAGE,
#              CPU torch from the host's package index (TORCH_* build args), WITH_NUNCHAKU=0
#              (Qwen); ComfyUI images: ComfyUI from a local git repo made from
#              $SMOKE_COMFYUI_SRC, and the test custom node scripts/smoke_custom_node/
#              smoke_invert from its folder (CUSTOM_NODES)
#   4. run     buildah from + buildah run --isolation chroot --network host, the image's own
#              entrypoint, user and environment, with PROFILE=tiny and a free PORT, on volume
#              folders owned by root (as a RunPod network volume is): /data, and for the
#              ComfyUI images /runpod-volume (MODELS_DIR is under it)
#   5. checks  GET /health; a tiny job (POST /v1/jobs, Prefer: wait) that must succeed and
#              whose first output must download (every service but the packed one); ComfyUI
#              images: a custom workflow that uses the custom node, whose output must be the
#              inverted colour; the volume folders now belong to uid 10001
#
# The host's pip configuration (index, extra indexes, find-links, constraints, CA bundle) is
# given to the build as read-only bind mounts (buildah bud --volume): it is used by the RUN
# steps and never stored in an image layer.
#
# Not proven here: the CUDA base image, CUDA torch (Qwen gets a CPU torch; the ComfyUI images
# get PyPI's torch 2.9.1, a CUDA build, run with --cpu), GPU kernels, Nunchaku.
#
# Settings (environment):
#   SMOKE_DIR            scratch folder (default build/image-smoke; rootfs, repos, logs)
#   SMOKE_BASE_IMAGE     base image name (default localhost/model-service-smoke-base:bookworm)
#   SMOKE_REBUILD_BASE=1 make the base again even if it exists
#   SMOKE_SUITE, SMOKE_MIRROR   debootstrap suite (bookworm) and mirror (Debian's default)
#   SMOKE_COMFYUI_SRC    ComfyUI tree for the ComfyUI images (default /tmp/comfyui; v0.33.0)
#   SMOKE_COMFYUI_REF    tag given to that tree (default v0.33.0)
#   SMOKE_TORCH_VERSION, SMOKE_TORCHVISION_VERSION, SMOKE_TORCH_CUDA, SMOKE_TORCH_INDEX_URL
#                        torch for the build (defaults per service, below)
#   SMOKE_JOB=0          only /health (ComfyUI images: ComfyUI is not started, COMFYUI_URL
#                        points at a closed port)
#   SMOKE_CUSTOM_NODE=0  ComfyUI images: build without the test custom node, skip its workflow
#   SMOKE_BUILD_ARGS     more `--build-arg K=V ...` for buildah bud
#   SMOKE_HEALTH_TIMEOUT, SMOKE_JOB_TIMEOUT   seconds (default 180, 900)
#   SMOKE_KEEP=1         keep the container after the run (default: buildah rm)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SERVICE="${1:-${SERVICE:-}}"
SMOKE_DIR="${SMOKE_DIR:-$ROOT/build/image-smoke}"
SMOKE_BASE_IMAGE="${SMOKE_BASE_IMAGE:-localhost/model-service-smoke-base:bookworm}"
SMOKE_SUITE="${SMOKE_SUITE:-bookworm}"
SMOKE_MIRROR="${SMOKE_MIRROR:-}"
SMOKE_COMFYUI_SRC="${SMOKE_COMFYUI_SRC:-/tmp/comfyui}"
SMOKE_COMFYUI_REF="${SMOKE_COMFYUI_REF:-v0.33.0}"
SMOKE_JOB="${SMOKE_JOB:-1}"
SMOKE_CUSTOM_NODE="${SMOKE_CUSTOM_NODE:-1}"
SMOKE_NODE=./scripts/smoke_custom_node/smoke_invert  # the custom node (test data)
APP_UID=10001
SMOKE_HEALTH_TIMEOUT="${SMOKE_HEALTH_TIMEOUT:-180}"
SMOKE_JOB_TIMEOUT="${SMOKE_JOB_TIMEOUT:-900}"
LOGS="$SMOKE_DIR/logs"

STAGE="setup"
say() { printf '\n==> [image-smoke %s] %s\n' "$STAGE" "$*"; }
die() {
    printf '\nimage-smoke FAILED at stage "%s" (%s): %s\n' "$STAGE" "${SERVICE:-?}" "$*" >&2
    exit 1
}

# --- which service, and what it needs (scripts/services.py: its image.toml) ----------------
[ -n "$SERVICE" ] || die "no service: scripts/image_smoke.sh <service> (or make image-smoke SERVICE=<service>)"
DOCKERFILE="$(python3 scripts/services.py show "$SERVICE" dockerfile 2>&1)" \
    || die "$DOCKERFILE (service folders: $(python3 scripts/services.py list | tr '\n' ' '))"
PORT_IN="$(python3 scripts/services.py show "$SERVICE" port)"
mapfile -t SERVICE_BUILD_ARGS < <(python3 scripts/services.py build-args "$SERVICE")
if [ "$(python3 scripts/services.py show "$SERVICE" baked)" = 1 ]; then
    die "$SERVICE has its weights baked in at build time (BAKE_WEIGHTS=1, many GB); smoke-test the service whose code it packs instead"
elif [ "$(python3 scripts/services.py show "$SERVICE" comfyui)" = 1 ]; then
    KIND=comfy
    # ComfyUI needs torch, torchvision and torchaudio of one release: PyPI's 2.9.1 set (a
    # CUDA build; ComfyUI runs it with --cpu), no local version suffix.
    : "${SMOKE_TORCH_VERSION:=2.9.1}" "${SMOKE_TORCHVISION_VERSION:=0.24.1}" \
        "${SMOKE_TORCH_CUDA=}"
else  # a Dockerfile of its own: Qwen (diffusers)
    KIND=qwen
    # A CPU torch for CPython 3.11 (bookworm's python3) that the host's pip finds
    # (here: /opt/wheels/torch-2.13.0+cpu-cp311-...). Nunchaku needs CUDA: left out.
    : "${SMOKE_TORCH_VERSION:=2.13.0}" "${SMOKE_TORCH_CUDA=cpu}"
fi
IMAGE="localhost/$SERVICE:smoke"
mkdir -p "$LOGS"

# --- 1. tools ----------------------------------------------------------------------------------
STAGE=tools
missing=()
for tool in debootstrap buildah podman curl python3; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        say "installing ${missing[*]} with apt-get"
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    else
        die "missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install debootstrap buildah podman curl python3; needs root)"
    fi
fi
[ "$(id -u)" = 0 ] || die "run as root: debootstrap and buildah's chroot isolation need it"

# --- 2. base -------------------------------------------------------------------------------------
STAGE=base
if [ "${SMOKE_REBUILD_BASE:-0}" != 1 ] && buildah inspect --type image "$SMOKE_BASE_IMAGE" > /dev/null 2>&1; then
    say "base $SMOKE_BASE_IMAGE exists (SMOKE_REBUILD_BASE=1 to make it again)"
else
    rootfs="$SMOKE_DIR/rootfs"
    say "debootstrap $SMOKE_SUITE into $rootfs (log: $LOGS/base.log)"
    rm -rf "$rootfs"
    start=$SECONDS
    # shellcheck disable=SC2086
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        "$SMOKE_SUITE" "$rootfs" $SMOKE_MIRROR > "$LOGS/base.log" 2>&1 \
        || die "debootstrap failed (last lines of $LOGS/base.log below)
$(tail -n 15 "$LOGS/base.log")"
    buildah rmi -f "$SMOKE_BASE_IMAGE" > /dev/null 2>&1 || true
    tar -C "$rootfs" -c . | podman import -q \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$SMOKE_BASE_IMAGE" > /dev/null \
        || die "podman import of $rootfs as $SMOKE_BASE_IMAGE failed"
    rm -rf "$rootfs"
    say "base $SMOKE_BASE_IMAGE made in $((SECONDS - start)) s"
fi

# --- 3. build ------------------------------------------------------------------------------------
STAGE=build
# --format docker: the OCI format ignores SHELL, and the Dockerfiles' RUN steps need bash.
build=(buildah bud --isolation chroot --layers --format docker -f "$DOCKERFILE" -t "$IMAGE"
    --build-arg "BASE_IMAGE=$SMOKE_BASE_IMAGE")
for arg in "${SERVICE_BUILD_ARGS[@]}"; do
    build+=(--build-arg "$arg")
done

# The host's pip settings, as one pip.conf mounted at /etc/pip.conf, and every local file or
# folder it names mounted read-only at the same path (the CA bundle at a path of its own, so
# that the image's ca-certificates package still owns /etc/ssl/certs).
pip_conf="$SMOKE_DIR/pip.conf"
mounts="$(python3 - "$pip_conf" << 'EOF'
import os, subprocess, sys
from urllib.parse import urlparse
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    if section not in (":env:", "global", "install", "download") or not name:
        continue
    settings[name] = value.strip().strip("'\"")
for env, name in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                  ("PIP_FIND_LINKS", "find-links"), ("PIP_CERT", "cert"),
                  ("PIP_CONSTRAINT", "constraint")):
    if os.environ.get(env):
        settings[name] = os.environ[env]
ca = settings.get("cert") or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
mounts = []
if ca and os.path.isfile(ca):
    mounts.append((os.path.realpath(ca), "/run/image-smoke/ca.crt"))
    settings["cert"] = "/run/image-smoke/ca.crt"
else:
    settings.pop("cert", None)
def local(path):
    if path.startswith("file://"):
        path = urlparse(path).path
        if path.rstrip("/").endswith("/simple"):  # an index: its files sit next to it
            path = os.path.dirname(path.rstrip("/"))
    return path if path.startswith("/") and os.path.exists(path) else None
for name in ("find-links", "extra-index-url", "index-url", "constraint"):
    for item in settings.get(name, "").split():
        path = local(item)
        if path:
            mounts.append((path, path))
keep = ("index-url", "extra-index-url", "find-links", "cert", "constraint", "default-timeout",
        "trusted-host", "proxy", "retries")
with open(sys.argv[1], "w") as f:
    f.write("[global]\n")
    for name in keep:
        if settings.get(name):
            f.write(f"{name} = {settings[name]}\n")
for src, dst in dict.fromkeys(mounts):
    print(f"{src}:{dst}:ro")
EOF
)" || die "could not read the host's pip configuration (pip config list)"
build+=(--volume "$pip_conf:/etc/pip.conf:ro")
while IFS= read -r mount; do
    [ -n "$mount" ] && build+=(--volume "$mount")
done <<< "$mounts"
index_url="$(sed -n 's/^index-url = //p' "$pip_conf")"
torch_index="${SMOKE_TORCH_INDEX_URL:-${index_url:-https://pypi.org/simple}}"
build+=(--build-arg "TORCH_VERSION=$SMOKE_TORCH_VERSION" --build-arg "TORCH_CUDA=$SMOKE_TORCH_CUDA"
    --build-arg "TORCH_INDEX_URL=$torch_index")

if [ "$KIND" = qwen ]; then
    build+=(--build-arg WITH_NUNCHAKU=0)
else
    build+=(--build-arg "TORCHVISION_VERSION=$SMOKE_TORCHVISION_VERSION")
    # ComfyUI from a local git repo (the Dockerfile clones COMFYUI_REPO at COMFYUI_REF).
    [ -f "$SMOKE_COMFYUI_SRC/main.py" ] \
        || die "SMOKE_COMFYUI_SRC=$SMOKE_COMFYUI_SRC is not a ComfyUI tree (no main.py); GitHub is not needed, but a ComfyUI $SMOKE_COMFYUI_REF tree is"
    repo="$SMOKE_DIR/comfyui.git"
    if ! git --git-dir="$repo" rev-parse -q --verify "refs/tags/$SMOKE_COMFYUI_REF" > /dev/null 2>&1; then
        say "making a git repo of $SMOKE_COMFYUI_SRC at $repo, tag $SMOKE_COMFYUI_REF"
        rm -rf "$repo"
        git init -q --bare "$repo" \
            && git --git-dir="$repo" --work-tree="$SMOKE_COMFYUI_SRC" add -A \
            && git --git-dir="$repo" --work-tree="$SMOKE_COMFYUI_SRC" \
                -c user.name=image-smoke -c user.email=image-smoke@localhost \
                commit -q -m "ComfyUI $SMOKE_COMFYUI_REF snapshot from $SMOKE_COMFYUI_SRC" \
            && git --git-dir="$repo" tag "$SMOKE_COMFYUI_REF" \
            || die "could not make the ComfyUI git repo at $repo"
    fi
    build+=(--volume "$repo:/run/image-smoke/comfyui.git:ro"
        --build-arg COMFYUI_REPO=/run/image-smoke/comfyui.git
        --build-arg "COMFYUI_REF=$SMOKE_COMFYUI_REF")
    # an empty hf_token secret: the Dockerfile's weights stage mounts it (BuildKit skips a
    # missing secret; this spares buildah the question)
    : > "$SMOKE_DIR/hf_token"
    build+=(--secret "id=hf_token,src=$SMOKE_DIR/hf_token")
    # the custom node from its folder in the build context (comfy-node-install)
    if [ "$SMOKE_CUSTOM_NODE" = 1 ]; then
        [ -f "$SMOKE_NODE/__init__.py" ] || die "no custom node at $SMOKE_NODE"
        build+=(--build-arg "CUSTOM_NODES=$SMOKE_NODE")
    fi
fi
# shellcheck disable=SC2206
build+=(${SMOKE_BUILD_ARGS:-} .)

say "building $IMAGE (log: $LOGS/$SERVICE-build.log)"
printf '%q ' "${build[@]}" > "$LOGS/$SERVICE-build.cmd"
start=$SECONDS
"${build[@]}" > "$LOGS/$SERVICE-build.log" 2>&1 \
    || die "buildah bud failed after $((SECONDS - start)) s (last lines of $LOGS/$SERVICE-build.log below)
$(tail -n 25 "$LOGS/$SERVICE-build.log")"
build_s=$((SECONDS - start))
size="$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)"
say "built $IMAGE in $build_s s, $size"

# --- 4. run --------------------------------------------------------------------------------------
STAGE=run
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ctr="$(buildah from --pull-never "$IMAGE")" || die "buildah from $IMAGE failed"
run_pid=""
# The run starts in a session of its own (setsid): its id is run_pid. tini gives the service
# a process group of its own, so the session (not the group) names every process we started.
session_pids() { ps -eo pid=,sid= | awk -v sid="$run_pid" '$2 == sid { print $1 }'; }
cleanup() {
    if [ -n "$run_pid" ]; then
        mapfile -t pids < <(session_pids)
        [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2> /dev/null || true
        for _ in $(seq 1 30); do [ -n "$(session_pids)" ] || break; sleep 1; done
        mapfile -t pids < <(session_pids)
        [ "${#pids[@]}" -gt 0 ] && kill -KILL "${pids[@]}" 2> /dev/null || true
        wait "$run_pid" 2> /dev/null || true
    fi
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
        echo "container kept: $ctr (buildah rm $ctr)"
    else
        buildah rm "$ctr" > /dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

env_args=(--env PROFILE=tiny --env "PORT=$port" --env LOG_FORMAT=json --env TINI_SUBREAPER=1)
# Volume folders owned by root, as a RunPod network volume is: the entrypoint must give them
# to uid $APP_UID (the service's user) before the service writes there.
volumes="$SMOKE_DIR/volumes/$SERVICE"
rm -rf "$volumes"
mkdir -p "$volumes/data"
run_mounts=(--volume "$volumes/data:/data")
if [ "$KIND" = comfy ]; then
    mkdir -p "$volumes/runpod-volume"
    run_mounts+=(--volume "$volumes/runpod-volume:/runpod-volume")
fi
chown -R 0:0 "$volumes" && chmod -R 755 "$volumes"
if [ "$KIND" = comfy ]; then
    [ "$SMOKE_CUSTOM_NODE" = 1 ] && env_args+=(--env ALLOW_CUSTOM_WORKFLOWS=1)
    cport="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    if [ "$SMOKE_JOB" = 1 ]; then
        env_args+=(--env "COMFYUI_PORT=$cport")
    else  # ComfyUI not started: the API must still answer /health
        env_args+=(--env "COMFYUI_URL=http://127.0.0.1:$cport")
    fi
fi
buildah config "${env_args[@]}" "$ctr" > /dev/null || die "buildah config $ctr failed"
mapfile -t entrypoint < <(buildah inspect --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$ctr")
[ "${#entrypoint[@]}" -gt 0 ] && [ -n "${entrypoint[0]}" ] || die "$IMAGE has no ENTRYPOINT"
user="$(buildah inspect --format '{{.OCIv1.Config.User}}' "$ctr")"

say "starting ${entrypoint[*]} as user ${user:-root} on 127.0.0.1:$port (log: $LOGS/$SERVICE-run.log)"
setsid buildah run --isolation chroot --network host "${run_mounts[@]}" "$ctr" -- "${entrypoint[@]}" \
    > "$LOGS/$SERVICE-run.log" 2>&1 < /dev/null &
run_pid=$!

# --- 5. checks -----------------------------------------------------------------------------------
STAGE=health
base="http://127.0.0.1:$port"
start=$SECONDS
until curl -fsS --max-time 5 "$base/health" > "$LOGS/$SERVICE-health.json" 2> /dev/null; do
    kill -0 "$run_pid" 2> /dev/null \
        || die "the service exited before /health answered (last lines of $LOGS/$SERVICE-run.log below)
$(tail -n 25 "$LOGS/$SERVICE-run.log")"
    [ $((SECONDS - start)) -lt "$SMOKE_HEALTH_TIMEOUT" ] \
        || die "no answer from $base/health in $SMOKE_HEALTH_TIMEOUT s (last lines of $LOGS/$SERVICE-run.log below)
$(tail -n 25 "$LOGS/$SERVICE-run.log")"
    sleep 1
done
say "GET /health after $((SECONDS - start)) s: $(cat "$LOGS/$SERVICE-health.json")"

checked="/health"
if [ "$SMOKE_JOB" != 1 ]; then
    say "SMOKE_JOB=$SMOKE_JOB: no job run"
else
    STAGE=job
    say "tiny job (timeout $SMOKE_JOB_TIMEOUT s)"
    start=$SECONDS
    # ComfyUI images built with the test custom node: then also a custom workflow that uses it
    custom_workflow=""
    [ "$KIND" = comfy ] && [ "$SMOKE_CUSTOM_NODE" = 1 ] \
        && custom_workflow=scripts/smoke_custom_node/workflow.json
    if ! python3 - "$base" "$SERVICE" "$SMOKE_JOB_TIMEOUT" "$SMOKE_DIR/$SERVICE-output" \
            "$custom_workflow" << 'EOF'
import json, struct, sys, time, urllib.error, urllib.request, uuid, zlib
from urllib.parse import urljoin

base, service, timeout, target = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
custom_workflow = sys.argv[5]

def call(method, path, body=None, headers=None, raw=False):
    request = urllib.request.Request(urljoin(base, path), data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
            return (data, response.headers.get("Content-Type", "")) if raw else json.loads(data)
    except urllib.error.HTTPError as error:
        sys.exit(f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')[:2000]}")

def run_job(job_input):
    """POST /v1/jobs and wait: the finished job, which must have succeeded with outputs."""
    headers = {"Content-Type": "application/json", "Prefer": "wait=60"}
    job = call("POST", "/v1/jobs", json.dumps({"input": job_input}).encode(), headers)
    print(f"job {job['id']}: {job['status']}", flush=True)
    deadline = time.monotonic() + timeout
    while job["status"] not in ("succeeded", "failed", "canceled", "cancelled"):
        if time.monotonic() > deadline:
            sys.exit(f"job {job['id']} still {job['status']} after {timeout:.0f} s")
        time.sleep(2)
        job = call("GET", f"/v1/jobs/{job['id']}")
    if job["status"] != "succeeded":
        sys.exit(f"job {job['id']} {job['status']}: {json.dumps(job.get('error'))}")
    if not job.get("outputs"):
        sys.exit(f"job {job['id']} succeeded without outputs: {json.dumps(job)[:2000]}")
    return job

def first_pixel(png):  # the first pixel of an 8-bit RGB(A) PNG
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        header = data if kind == b"IHDR" else header
        idat += data if kind == b"IDAT" else b""
        pos += 12 + length
    assert header[8] == 8 and header[9] in (2, 6), f"not 8-bit RGB(A): {header[8:10]}"
    row = zlib.decompress(idat)
    # row 0, pixel 0: every PNG filter predicts it from zeros, so its bytes are the pixel's
    return tuple(row[1:4])

def png(width, height):
    rows = b"".join(b"\x00" + bytes((30, 60, 160)) * width for _ in range(height))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))

if service == "qwen-image-edit-nunchaku":
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png(64, 64) + f"\r\n--{boundary}--\r\n".encode()
    upload = call("POST", "/v1/uploads", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    job_input = {"image": upload["id"], "prompt": "make it red", "width": 64, "height": 64, "steps": 2}
elif service == "infinite-talk-v1":  # a face and 0.6 s of a 220 Hz tone in bursts
    import base64, io, math, wave
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"".join(
            struct.pack("<h", int(12000 * math.sin(2 * math.pi * 220 * i / 16000)) if (i // 1600) % 2 == 0 else 0)
            for i in range(9600)))
    data_uri = lambda mime, data: f"data:{mime};base64," + base64.b64encode(data).decode()
    job_input = {"image": data_uri("image/png", png(64, 64)), "audio": data_uri("audio/wav", buffer.getvalue()),
                 "width": 64, "height": 64, "steps": 2, "window_frames": 17}
else:  # FastWan and Wan2.2-14B: text-to-video
    job_input = {"prompt": "x", "width": 64, "height": 64, "num_frames": 9}

job = run_job(job_input)
output = job["outputs"][0]
data, content_type = call("GET", output["url"], raw=True)
magic = {"image/png": data[:8] == b"\x89PNG\r\n\x1a\n", "video/mp4": data[4:8] == b"ftyp"}
if not data or not magic.get(output.get("content_type", content_type), True):
    sys.exit(f"output {output['name']} ({output.get('content_type')}, {len(data)} bytes) is not what it says")
path = f"{target}-{output['name']}"
with open(path, "wb") as f:
    f.write(data)
print(f"job {job['id']} succeeded; output {output['name']} {output.get('content_type')} "
      f"{len(data)} bytes -> {path}; timings {json.dumps(job.get('timings'))}")

if custom_workflow:  # EmptyImage -> SmokeInvert (the custom node) -> SaveImage
    workflow = json.load(open(custom_workflow))
    job = run_job({"workflow": workflow})
    color = workflow["1"]["inputs"]["color"]
    want = tuple(255 - ((color >> shift) & 0xFF) for shift in (16, 8, 0))
    got = first_pixel(call("GET", job["outputs"][0]["url"], raw=True)[0])
    if any(abs(g - w) > 1 for g, w in zip(got, want)):  # 255 * (1 - x) may round down
        sys.exit(f"SmokeInvert gave {got}, not the inverse of {color:#08x}: {want}")
    print(f"job {job['id']} (custom node) succeeded: SmokeInvert turned {color:#08x} into {got}")
EOF
    then
        die "the tiny job failed (last lines of $LOGS/$SERVICE-run.log below)
$(tail -n 25 "$LOGS/$SERVICE-run.log")"
    fi
    say "tiny job passed in $((SECONDS - start)) s"
    checked="/health and a tiny job"
    [ -n "$custom_workflow" ] && checked="$checked, a workflow with a custom node"
fi

STAGE=volumes
# The root-owned volume folders, and what the service wrote in them, now belong to its user.
# (/data is DATA_DIR itself; under /runpod-volume, MODELS_DIR and HF_HOME are taken, not its root)
not_ours="$(find "$volumes" -mindepth 2 -maxdepth 3 ! -uid "$APP_UID" -print | head -n 5)"
[ "$(stat -c %u "$volumes/data")" = "$APP_UID" ] || not_ours="$volumes/data $not_ours"
[ -z "$not_ours" ] || die "not given to uid $APP_UID by the entrypoint: $not_ours"
if [ "$SMOKE_JOB" = 1 ] && [ -z "$(find "$volumes/data" -mindepth 1 -uid "$APP_UID" -print -quit)" ]; then
    die "the service wrote nothing in /data (as uid $APP_UID)"
fi
say "root-owned volume folders taken by uid $APP_UID: $(ls "$volumes" | tr '\n' ' ')"
checked="$checked, on root-owned volumes"

STAGE=done
say "PASSED: $SERVICE built on $SMOKE_BASE_IMAGE in $build_s s ($size), served $checked; not proven: CUDA base image, CUDA torch, GPU kernels, Nunchaku"

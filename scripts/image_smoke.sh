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
#   3. build   buildah bud --isolation chroot, the base passed as BASE_IMAGE, CPU torch from
#              the host's package index (TORCH_* build args), WITH_NUNCHAKU=0 (Qwen), ComfyUI
#              from a local git repo made from $SMOKE_COMFYUI_SRC (ComfyUI images)
#   4. run     buildah from + buildah run --isolation chroot --network host, the image's own
#              entrypoint, user and environment, with PROFILE=tiny and a free PORT
#   5. checks  GET /health; a tiny job (POST /v1/jobs, Prefer: wait) that must succeed and
#              whose first output must download (every service but the packed one)
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
SMOKE_HEALTH_TIMEOUT="${SMOKE_HEALTH_TIMEOUT:-180}"
SMOKE_JOB_TIMEOUT="${SMOKE_JOB_TIMEOUT:-900}"
LOGS="$SMOKE_DIR/logs"

STAGE="setup"
say() { printf '\n==> [image-smoke %s] %s\n' "$STAGE" "$*"; }
die() {
    printf '\nimage-smoke FAILED at stage "%s" (%s): %s\n' "$STAGE" "${SERVICE:-?}" "$*" >&2
    exit 1
}

# --- which service, and what it needs ---------------------------------------------------------
case "$SERVICE" in
    qwen-image-edit-nunchaku)
        KIND=qwen PORT_IN=8000
        # A CPU torch for CPython 3.11 (bookworm's python3) that the host's pip finds
        # (here: /opt/wheels/torch-2.13.0+cpu-cp311-...). Nunchaku needs CUDA: left out.
        : "${SMOKE_TORCH_VERSION:=2.13.0}" "${SMOKE_TORCH_CUDA=cpu}"
        ;;
    fastwan2.2-5b-network-storage | wan2.2-14b-loras-v1 | infinite-talk-v1)
        KIND=comfy PORT_IN=8189
        # ComfyUI needs torch, torchvision and torchaudio of one release: PyPI's 2.9.1 set (a
        # CUDA build; ComfyUI runs it with --cpu), no local version suffix.
        : "${SMOKE_TORCH_VERSION:=2.9.1}" "${SMOKE_TORCHVISION_VERSION:=0.24.1}" \
            "${SMOKE_TORCH_CUDA=}"
        ;;
    fastwan2.2-5b-packed)
        die "fastwan2.2-5b-packed is the network-storage image plus ~18 GB of weights fetched at build time; smoke-test fastwan2.2-5b-network-storage instead" ;;
    "")
        die "no service: scripts/image_smoke.sh <service> (or make image-smoke SERVICE=<service>)" ;;
    *)
        [ -f "$SERVICE/Dockerfile" ] || die "unknown service '$SERVICE' (no $SERVICE/Dockerfile)"
        die "no smoke recipe for '$SERVICE' in scripts/image_smoke.sh" ;;
esac
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
build=(buildah bud --isolation chroot --layers --format docker -f "$SERVICE/Dockerfile" -t "$IMAGE"
    --build-arg "BASE_IMAGE=$SMOKE_BASE_IMAGE")

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
if [ "$KIND" = comfy ]; then
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
setsid buildah run --isolation chroot --network host "$ctr" -- "${entrypoint[@]}" \
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
    if ! python3 - "$base" "$SERVICE" "$SMOKE_JOB_TIMEOUT" "$SMOKE_DIR/$SERVICE-output" << 'EOF'
import json, struct, sys, time, urllib.error, urllib.request, uuid, zlib
from urllib.parse import urljoin

base, service, timeout, target = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

def call(method, path, body=None, headers=None, raw=False):
    request = urllib.request.Request(urljoin(base, path), data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
            return (data, response.headers.get("Content-Type", "")) if raw else json.loads(data)
    except urllib.error.HTTPError as error:
        sys.exit(f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')[:2000]}")

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
EOF
    then
        die "the tiny job failed (last lines of $LOGS/$SERVICE-run.log below)
$(tail -n 25 "$LOGS/$SERVICE-run.log")"
    fi
    say "tiny job passed in $((SECONDS - start)) s"
    checked="/health and a tiny job"
fi

STAGE=done
say "PASSED: $SERVICE built on $SMOKE_BASE_IMAGE in $build_s s ($size), served $checked; not proven: CUDA base image, CUDA torch, GPU kernels, Nunchaku"

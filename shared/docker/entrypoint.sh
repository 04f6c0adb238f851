#!/bin/sh
# The images' entrypoint (under tini): make sure the folders the service writes are writable
# by the service user, then run the command as that user.
#
#   entrypoint.sh model-service serve <service>
#
# Started as root (the images' default, and what RunPod does): each folder in WRITABLE_PATHS
# is created if missing and whatever in it is not owned by APP_UID yet is given to it (a RunPod
# network volume is owned by root), then the command runs as APP_UID:APP_GID (setpriv, from
# util-linux). Started as any other user (`docker run --user 10001`, Kubernetes runAsUser):
# each folder must already be writable by that user; if one is not, it exits with status 78
# saying which folder, who owns it, and the two ways out.
#
# Environment:
#   APP_UID, APP_GID   the service user (default 10001:10001; the images create it)
#   WRITABLE_SETTINGS  the settings (environment variables) that name folders the service
#                      writes (default "DATA_DIR MODELS_DIR HF_HOME"; the Qwen image, which
#                      never downloads: "DATA_DIR"); unset or empty ones are skipped
#   WRITABLE_PATHS     the folders themselves, instead (space-separated)
#   FIX_OWNERSHIP=0    as root: do not chown, only check (and then still drop to APP_UID)
#   RUN_AS_ROOT=1      as root: take ownership as usual but run the command as root
set -eu

APP_UID="${APP_UID:-10001}"
APP_GID="${APP_GID:-$APP_UID}"
if [ -z "${WRITABLE_PATHS+set}" ]; then
    WRITABLE_PATHS=""
    for name in ${WRITABLE_SETTINGS-DATA_DIR MODELS_DIR HF_HOME}; do
        WRITABLE_PATHS="$WRITABLE_PATHS $(printenv "$name" || true)"
    done
fi

say() { printf 'entrypoint: %s\n' "$*" >&2; }

[ "$#" -gt 0 ] || { say "no command given"; exit 64; }

# Can user $1 (numeric uid) write into folder $2? Tested by writing, not from the mode bits:
# network file systems (and root-squashed NFS) answer `test -w` wrongly.
probe() {
    probe_file="$2/.write-test.$$"
    if [ "$1" = "$(id -u)" ]; then
        (: > "$probe_file") 2> /dev/null && rm -f "$probe_file"
    else
        setpriv --reuid="$1" --regid="$APP_GID" --clear-groups -- \
            sh -c ': > "$1" && rm -f "$1"' probe "$probe_file" 2> /dev/null
    fi
}

owner_of() { stat -c 'owned by uid %u, gid %g, mode %A' "$1" 2> /dev/null || echo 'unreadable'; }

cannot_write() {  # $1: folder, $2: uid that cannot write it, $3: what went wrong
    cat >&2 << EOF
entrypoint: ERROR: the service cannot write to $1 ($3; $(owner_of "$1")).
  This container runs as uid $2; the service stores its jobs, outputs and downloaded
  model files there. Either
  - run the container as root (the image's default: leave out --user / runAsUser): it then
    gives $1 to uid $APP_UID itself and runs the service as uid $APP_UID; or
  - give the folder to uid $APP_UID once, where it is mounted from (on the host, or from a
    shell in a root container): chown -R $APP_UID:$APP_GID <that folder>; or
  - point the setting at a writable folder (DATA_DIR, MODELS_DIR, HF_HOME).
EOF
    exit 78
}

uid="$(id -u)"
for dir in $WRITABLE_PATHS; do
    if ! mkdir -p "$dir" 2> /dev/null; then
        cannot_write "$dir" "$uid" "it does not exist and cannot be created"
    fi
    if [ "$uid" = 0 ] && [ "${RUN_AS_ROOT:-0}" != 1 ]; then
        if [ "${FIX_OWNERSHIP:-1}" = 1 ]; then
            # Only what is not ours yet: a no-op on every start after the first.
            if [ -n "$(find "$dir" -xdev ! -uid "$APP_UID" -print -quit 2> /dev/null)" ]; then
                say "giving $dir to uid $APP_UID (it was $(owner_of "$dir"))"
                find "$dir" -xdev ! -uid "$APP_UID" -exec chown -h "$APP_UID:$APP_GID" {} + \
                    2> /dev/null || true
            fi
        fi
        if [ "${FIX_OWNERSHIP:-1}" = 1 ]; then
            why="root could not give it to uid $APP_UID (a read-only or root-squashed mount?)"
        else
            why="not writable by uid $APP_UID, and FIX_OWNERSHIP=0"
        fi
        probe "$APP_UID" "$dir" || cannot_write "$dir" "$APP_UID" "$why"
    elif ! probe "$uid" "$dir"; then
        cannot_write "$dir" "$uid" "not writable by this user"
    fi
done

if [ "$uid" = 0 ] && [ "${RUN_AS_ROOT:-0}" != 1 ]; then
    HOME="$(getent passwd "$APP_UID" | cut -d: -f6)"
    export HOME="${HOME:-/tmp}"
    exec setpriv --reuid="$APP_UID" --regid="$APP_GID" --clear-groups -- "$@"
fi
exec "$@"

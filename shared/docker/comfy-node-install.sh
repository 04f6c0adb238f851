#!/usr/bin/env bash
# Install ComfyUI custom nodes into the image's ComfyUI ($COMFYUI_DIR) and its venv
# ($COMFYUI_VENV), with torch held to the build the image has (a constraint: a node that asks
# for another torch fails the install instead of replacing it). Fails on the first node that
# does not install, naming it.
#
#   comfy-node-install <node> [<node> ...]
#
# Each <node> is one of
#   <registry id>[@<version>]     from the Comfy Registry (registry.comfy.org), with comfy-cli
#                                 (`comfy node registry-install`); pin the version
#   <git URL>@<ref>               a git repository at a tag or commit (the ref is required:
#                                 an unpinned branch would change under a rebuild)
#   ./<folder> or /<folder>       a node folder: in the build context (./, read through the
#                                 Dockerfile's bind mount at $CONTEXT_DIR) or in the image
# Then each node's requirements.txt is installed into ComfyUI's venv and its install.py run
# (what comfy-cli and ComfyUI-Manager do), and `pip check` must pass.
set -euo pipefail

COMFYUI_DIR="${COMFYUI_DIR:-/opt/comfyui}"
COMFYUI_VENV="${COMFYUI_VENV:-/opt/comfyui-venv}"
CONTEXT_DIR="${CONTEXT_DIR:-/src/context}"
CONSTRAINTS="${COMFYUI_CONSTRAINTS:-$COMFYUI_VENV/constraints.txt}"
NODES_DIR="$COMFYUI_DIR/custom_nodes"
pip=("$COMFYUI_VENV/bin/python" -m pip install --no-cache-dir)
[ -f "$CONSTRAINTS" ] && pip+=(-c "$CONSTRAINTS")

die() { printf 'comfy-node-install: %s\n' "$*" >&2; exit 1; }
say() { printf '\n==> comfy-node-install: %s\n' "$*"; }

[ -d "$NODES_DIR" ] || die "no $NODES_DIR: is COMFYUI_DIR ($COMFYUI_DIR) a ComfyUI?"

deps() {  # $1: an installed node folder
    if [ -f "$1/requirements.txt" ]; then
        "${pip[@]}" -r "$1/requirements.txt" || die "$(basename "$1"): its requirements.txt did not install"
    fi
    if [ -f "$1/install.py" ]; then
        (cd "$1" && "$COMFYUI_VENV/bin/python" install.py) || die "$(basename "$1"): install.py failed"
    fi
}

for node in "$@"; do
    case "$node" in
        ./* | /*)  # a folder
            src="$node"
            [[ "$node" == ./* ]] && src="$CONTEXT_DIR/${node#./}"
            [ -d "$src" ] || die "$node: no such folder (a ./path is read from the build context)"
            name="$(basename "$src")"
            say "$name from the folder $node"
            rm -rf "${NODES_DIR:?}/$name"
            cp -a "$src" "$NODES_DIR/$name"
            ;;
        *://* | git@*)  # a git repository at a pinned ref
            url="${node%@*}" ref="${node##*@}"
            if [ "$url" = "$node" ] || [ -z "$ref" ] || [[ "$ref" == */* || "$ref" == *:* ]]; then
                die "$node: give the ref to install, <git URL>@<tag or commit>"
            fi
            name="$(basename "${url%.git}")"
            say "$name from $url at $ref"
            rm -rf "${NODES_DIR:?}/$name"
            git clone --quiet -- "$url" "$NODES_DIR/$name" || die "$node: git clone failed"
            git -C "$NODES_DIR/$name" -c advice.detachedHead=false checkout --quiet "$ref" -- \
                || die "$node: no ref $ref in $url"
            git -C "$NODES_DIR/$name" submodule update --init --recursive --quiet
            git -C "$NODES_DIR/$name" log -1 --format="$name %H %s"
            rm -rf "$NODES_DIR/$name/.git"
            ;;
        *)  # a registry id
            id="${node%@*}" version=""
            [ "$id" != "$node" ] && version="${node##*@}"
            say "$id${version:+ $version} from the Comfy Registry"
            args=(node registry-install "$id" --force-download)
            [ -n "$version" ] && args+=(--version "$version")
            # VIRTUAL_ENV: comfy-cli installs into this Python (its own venv is separate)
            VIRTUAL_ENV="$COMFYUI_VENV" PIP_CONSTRAINT="$([ -f "$CONSTRAINTS" ] && echo "$CONSTRAINTS")" \
                comfy --skip-prompt --workspace "$COMFYUI_DIR" "${args[@]}" \
                || die "$node: comfy node registry-install failed"
            name="$id"
            [ -d "$NODES_DIR/$name" ] || die "$node: comfy-cli did not install it into $NODES_DIR/$name"
            ;;
    esac
    deps "$NODES_DIR/$name"
done

"$COMFYUI_VENV/bin/python" -m pip check || die "the custom nodes' requirements conflict (pip check above)"

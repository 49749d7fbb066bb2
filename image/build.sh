#!/usr/bin/env bash
# `make image`: builds txmail's container image without a registry or a container engine, as an
# OCI archive (a tar of an OCI image layout), and prints the archive's path as its last line on
# stdout (progress goes to stderr).
#   image/build.sh        ghcr.io/txmail/txmail:<version in pyproject.toml>: a Debian bookworm root
#                         made by mmdebstrap with the Containerfile's packages, wheels and steps
#                         (image/packages, requirements.lock, image/wheels.py, image/install.sh),
#                         packed by umoci
#                         with the Containerfile's user, environment, command and labels
#   image/build.sh pause  localhost/txmail/pause:3.10: the pod sandbox image of the node tier, the
#                         static pause binary built by tests/cluster/build.sh
# Archives go to ${TXMAIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/txmail}/image/<key>/, the key a
# hash of every file they are built from, so a second run builds nothing.
# Needs mmdebstrap and umoci (make debs), python3 >= 3.11 with venv, network access to Debian's
# mirror and PyPI (TXMAIL_DEBIAN_MIRROR, TXMAIL_DEBIAN_SECURITY_MIRROR and pip's PIP_INDEX_URL
# choose others), and root or unprivileged user namespaces (mmdebstrap's root or unshare mode).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache="${TXMAIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/txmail}/image"
python=${PYTHON:-python3}
mirror=${TXMAIL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${TXMAIL_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
repository=ghcr.io/txmail/txmail
pause_ref=localhost/txmail/pause:3.10
source_url=https://github.com/txmail/txmail

say() { echo "image/build.sh: $*" >&2; }
die() {
  say "$*"
  exit 1
}
need() { command -v "$1" >/dev/null || die "$1 is needed ($2)"; }

case "${1:-txmail}" in
txmail | pause) what=${1:-txmail} ;;
*)
  echo "usage: image/build.sh [txmail|pause]" >&2
  exit 2
  ;;
esac
need umoci "make debs installs it"
need "$python" "Python 3.11 or newer, or set PYTHON"
mkdir -p "$cache"
# One build at a time: a second caller waits, then finds the archive in the cache.
exec 9>"$cache/.lock"
flock 9

# umoci_pack LAYOUT TAG LAYER_TAR CONFIG_ARGS...: an image of one layer, configured.
umoci_pack() {
  local layout=$1 tag=$2 layer=$3
  shift 3
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci raw add-layer --image "$layout:$tag" "$layer"
  umoci config --image "$layout:$tag" --os linux --architecture amd64 "$@"
  umoci gc --layout "$layout"
}

# write_archive LAYOUT REF OUT: name the image REF (containerd, podman and docker read the
# io.containerd.image.name annotation; the OCI ref.name stays the tag) and tar the layout to OUT.
write_archive() {
  local layout=$1 ref=$2 out=$3
  "$python" - "$layout/index.json" "$ref" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
(manifest,) = index["manifests"]
manifest.setdefault("annotations", {})["io.containerd.image.name"] = ref
with open(path, "w") as f:
    json.dump(index, f, separators=(",", ":"))
EOF
  mkdir -p "$(dirname "$out")"
  tar --sort=name --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$out.tmp" \
    oci-layout index.json blobs
  mv "$out.tmp" "$out"
  local layers
  layers=$("$python" -c '
import json, pathlib, sys
layout = pathlib.Path(sys.argv[1])
index = json.loads((layout / "index.json").read_text())
digest = index["manifests"][0]["digest"].split(":")[1]
manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
print(sum(layer["size"] for layer in manifest["layers"]))' "$layout")
  say "$ref: archive $(stat -c %s "$out" | numfmt --to=si)B, compressed layers $(numfmt --to=si "$layers")B"
}

if [ "$what" = pause ]; then
  bins=$("$root/tests/cluster/build.sh")
  [ -x "$bins/pause" ] || die "tests/cluster/build.sh printed $bins, which has no pause binary"
  key=pause-$(cat "$bins/pause" "$0" | sha256sum | cut -c1-16)
  out="$cache/$key/pause.oci.tar"
  if [ ! -f "$out" ]; then
    tmp=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir "$tmp/root"
    install -m 0755 "$bins/pause" "$tmp/root/pause"
    tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$tmp/root" -cf "$tmp/layer.tar" pause
    umoci_pack "$tmp/oci" "${pause_ref##*:}" "$tmp/layer.tar" \
      --config.entrypoint /pause --config.user 65535:65535 \
      --config.label "org.opencontainers.image.title=pause" \
      --config.label "org.opencontainers.image.source=$source_url" >&2
    write_archive "$tmp/oci" "$pause_ref" "$out"
  fi
  echo "$out"
  exit 0
fi

need mmdebstrap "make debs installs it"
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
# Everything the image is built from, by path and content (uncommitted edits count).
cd "$root"
key=$(
  {
    printf '%s\n' requirements.lock pyproject.toml README.md Containerfile
    find image operator relay -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
      ! -path '*.egg-info/*'
  } | LC_ALL=C sort | tr '\n' '\0' | xargs -0 sha256sum | sha256sum | cut -c1-16
)
out="$cache/$key/txmail.oci.tar"
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi

start=$(date +%s)
say "building $repository:$version into $out"
tmp=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/stage" # copied to /tmp/txmail-build in the root, removed by install.sh finish
mkdir -p "$stage/wheels" "$tmp/src"

# A build venv on this machine: the locked setuptools builds txmail's wheel; image/wheels.py
# (as in the Containerfile) has its pip download the locked wheels for the image's platform
# (bookworm: glibc 2.36, CPython 3.11, x86_64), hash-checked, and its setuptools build a wheel of
# each pure-Python package that has only an sdist, then writes install.lock: every package with
# the sha256 of its wheel. Cached by lock, build lock and script.
"$python" -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip --disable-pip-version-check --no-input"
$pip install --quiet --require-hashes --no-deps --only-binary=:all: \
  -r image/build-requirements.lock >&2
wheels="$cache/wheels/$(cat requirements.lock image/build-requirements.lock image/wheels.py |
  sha256sum | cut -c1-16)"
if [ ! -f "$wheels/.complete" ]; then
  rm -rf "$wheels"
  # pip does not widen manylinux_2_36 to the older glibc tags it implies: list them all, newest
  # first with each legacy alias after its glibc, the order pip on bookworm itself prefers (so
  # the Containerfile's native download picks the same wheel of a package that has several).
  platforms=()
  for glibc in $(seq 36 -1 5); do
    platforms+=(--platform "manylinux_2_${glibc}_x86_64")
    case $glibc in
    17) platforms+=(--platform manylinux2014_x86_64) ;;
    12) platforms+=(--platform manylinux2010_x86_64) ;;
    5) platforms+=(--platform manylinux1_x86_64) ;;
    esac
  done
  "$tmp/venv/bin/python" image/wheels.py requirements.lock "$wheels" "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 >&2
  touch "$wheels/.complete"
fi
cp "$wheels"/*.whl "$stage/wheels/"
tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
  pyproject.toml README.md operator relay | tar -C "$tmp/src" -xf -
$pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir -w "$stage" "$tmp/src" >&2
wheel=$(cd "$stage" && echo txmail-*.whl)
[ -f "$stage/$wheel" ] || die "no txmail wheel was built"
cp "$wheels/install.lock" image/install.sh "$stage/"
say "wheels ready after $(($(date +%s) - start)) s"

# The root: the packages of image/packages (and python3-venv to make the venv, purged after),
# then image/install.sh as the Containerfile runs it. Downloaded .debs are kept in the cache.
packages=$(grep -v '^#' image/packages | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
debs="$cache/debs"
mkdir -p "$debs"
in=/tmp/txmail-build
clean="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin" # no PIP_* or other settings of this machine
mmdebstrap --variant=essential --include="$packages,python3-venv" \
  --dpkgopt="$here/dpkg-excludes" --aptopt='Acquire::Retries "3"' \
  --skip=output/dev --skip=output/mknod --skip=essential/unlink \
  --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
  --setup-hook="sync-in '$debs' /var/cache/apt/archives" \
  --customize-hook="sync-out /var/cache/apt/archives '$debs'" \
  --customize-hook="mkdir -p \"\$1$in\"" --customize-hook="sync-in '$stage' $in" \
  --customize-hook="chroot \"\$1\" $clean sh $in/install.sh venv $in/install.lock $in/$wheel --no-index --find-links $in/wheels" \
  --customize-hook="chroot \"\$1\" $clean dpkg --purge python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl" \
  --customize-hook="chroot \"\$1\" $clean sh $in/install.sh finish" \
  bookworm "$tmp/rootfs.tar" \
  "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" >&2
rm -f "$debs"/lock "$debs"/partial -r
say "root filesystem ready after $(($(date +%s) - start)) s ($(stat -c %s "$tmp/rootfs.tar" | numfmt --to=si)B)"

# The Containerfile's ENV, USER, CMD and LABELs (tests/image checks they agree).
umoci_pack "$tmp/oci" "$version" "$tmp/rootfs.tar" \
  --config.user 65532:65532 --config.workingdir / \
  --config.env PATH=/opt/txmail/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 \
  --config.env LANG=C.UTF-8 \
  --config.cmd txmail-operator \
  --config.label org.opencontainers.image.title=txmail \
  --config.label "org.opencontainers.image.description=txmail-operator and txmail-relay" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.source=$source_url" \
  --config.label org.opencontainers.image.licenses=Apache-2.0 >&2
write_archive "$tmp/oci" "$repository:$version" "$out"
say "built $repository:$version in $(($(date +%s) - start)) s"
# Keep the three newest images and wheel sets; older ones belong to sources long gone.
for old in $(ls -dt "$cache"/*/txmail.oci.tar | tail -n +4) $(ls -dt "$cache"/wheels/*/ | tail -n +4); do
  rm -rf "${old%/txmail.oci.tar}"
done
echo "$out"

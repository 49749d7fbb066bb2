#!/bin/sh
# The steps both image builds run as root inside the image's root filesystem: the Containerfile
# in its stages, image/build.sh in the mmdebstrap root (chroot). Keeping them here keeps the two
# images the same.
#   install.sh venv LOCK WHEEL [PIP_OPTION...]  /opt/txmail: a venv of the system python3 with the
#                                               wheels of LOCK (hashes checked, no resolution),
#                                               then txmail's own wheel, compiled to .pyc. Both
#                                               builds pass the install.lock of image/wheels.py
#                                               and --no-index --find-links its folder: the image
#                                               root fetches nothing and builds nothing
#   install.sh finish                           the txmail user (65532); caches, logs, apt lists
set -eu
venv=/opt/txmail

case "${1:-}" in
venv)
  [ $# -ge 3 ] || { echo "usage: install.sh venv LOCK WHEEL [PIP_OPTION...]" >&2; exit 2; }
  lock=$2 wheel=$3
  shift 3
  python3 -m venv "$venv"
  pip="$venv/bin/python -m pip --quiet --disable-pip-version-check --no-cache-dir --no-input"
  $pip install --require-hashes --no-deps --only-binary=:all: "$@" -r "$lock"
  $pip install --no-deps --no-index "$wheel"
  $pip uninstall --yes pip setuptools
  # The root filesystem is read-only at run time (PYTHONDONTWRITEBYTECODE=1): compile every
  # module now. The image never changes, so the .pyc files need no source check.
  find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
  "$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$venv/lib"
  ;;
finish)
  grep -q '^txmail:' /etc/group || echo 'txmail:x:65532:' >>/etc/group
  grep -q '^txmail:' /etc/passwd ||
    echo 'txmail:x:65532:65532:txmail:/nonexistent:/usr/sbin/nologin' >>/etc/passwd
  rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/* \
    /root/.cache /tmp/* /var/tmp/*
  # What image/dpkg-excludes keeps out of packages, also where the base system brought it.
  rm -rf /usr/share/man/* /usr/share/info/* /usr/share/groff/* /usr/share/lintian/* \
    /usr/share/linda/* /usr/share/locale/*
  find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
  find /usr/share/doc -mindepth 1 -type d -empty -delete
  ;;
*)
  echo "usage: install.sh venv LOCK WHEEL [PIP_OPTION...] | install.sh finish" >&2
  exit 2
  ;;
esac

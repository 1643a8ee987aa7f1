#!/usr/bin/env bash
# The tools CI runs beside the project's own, installed once into TOOLS and reused:
#
#   .ci/tools.sh promtool   promtool alone, from Debian's `prometheus` package: the package is
#                           downloaded and the binary taken out of it; nothing is installed, no
#                           service set up or started. Needs apt-get (root) the first time.
#   .ci/tools.sh checkov    checkov $CHECKOV_VERSION, in a virtual environment of its own: it pins
#                           dozens of dependencies of its own, which the project's must not meet.
#
# Each prints its directory of commands, to put on PATH. Idempotent: a tool already there is kept.
# TOOLS is $MAILGUN_SYNC_TOOLS, else /var/tmp/mailgun-sync-tools.
set -euo pipefail
CHECKOV_VERSION=3.3.30
tools=${MAILGUN_SYNC_TOOLS:-/var/tmp/mailgun-sync-tools}
mkdir -p "$tools/bin"

case ${1:-} in
  promtool)
    if [[ ! -x $tools/bin/promtool ]]; then
      work=$(mktemp -d)
      trap 'rm -rf "$work"' EXIT
      chown _apt "$work" 2>/dev/null || true  # apt downloads as its own user where it can
      download() { (cd "$work" && apt-get download -qq prometheus >/dev/null); }
      # A machine whose package lists were never read knows no candidate yet.
      download 2>/dev/null || { apt-get update -qq >/dev/null && download; }
      dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$tools/bin/promtool.part"
      chmod 755 "$tools/bin/promtool.part"
      mv "$tools/bin/promtool.part" "$tools/bin/promtool"
    fi
    "$tools/bin/promtool" --version 2>&1 | head -1 >&2
    ;;
  checkov)
    venv=$tools/checkov-$CHECKOV_VERSION
    if [[ ! -f $venv/.installed ]]; then  # a half-made one (an interrupted install) is made anew
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
      touch "$venv/.installed"
    fi
    ln -sfn "$venv/bin/checkov" "$tools/bin/checkov"
    echo "checkov $("$tools/bin/checkov" --version)" >&2
    ;;
  *)
    echo "usage: $0 promtool|checkov" >&2
    exit 2
    ;;
esac
echo "$tools/bin"

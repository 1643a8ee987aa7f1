#!/usr/bin/env bash
# checkov over deploy/k8s as the files stand, over every kustomization in it as kustomize renders
# it (the base, the backfill, the monitoring, each overlay and its backfill), and over the
# Dockerfile. Exit 1 on a failed check. Each deliberate exception is skipped in the manifest itself,
# with its reason (tests/test_deploy.py checks there is one).
#
# The overlays are rendered here, each to a file named after its path, rather than by checkov's own
# kustomize framework, which names its output after the directory's last component alone: two
# directories called `backfill` overwrite each other's output and make the scan fail at random.
set -euo pipefail
cd "$(dirname "$0")/.."
tools_bin=$(.ci/tools.sh checkov)
checkov() { "$tools_bin/checkov" --skip-download --compact --quiet "$@"; }

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
renderer=()
if command -v kubectl >/dev/null; then
  renderer=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  renderer=(kustomize build)
fi

echo "checkov: deploy/k8s as the files stand"
checkov --directory deploy/k8s --framework kubernetes
if ((${#renderer[@]})); then
  for kustomization in $(find deploy/k8s -name kustomization.yaml | sort); do
    directory=$(dirname "$kustomization")
    "${renderer[@]}" "$directory" >"$rendered/$(echo "${directory#deploy/k8s/}" | tr / -).yaml"
  done
  echo "checkov: every kustomization as kustomize renders it ($(ls "$rendered" | tr '\n' ' '))"
  checkov --directory "$rendered" --framework kubernetes
else
  printf '%s\n' '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!' \
    '!! SKIPPED: the overlays as kustomize renders them: neither kubectl nor kustomize is installed' \
    '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
fi
echo "checkov: the Dockerfile"
checkov --file Dockerfile --framework dockerfile

#!/usr/bin/env bash
# The system packages `spinegrade serve`'s tests and local trial need: a real PACS (Orthanc with
# its DICOMweb plugin) and a real browser (Chromium + chromedriver) for the page test.
# Run as root on Debian/Ubuntu (CI does, from .ci/run). Elsewhere it says what to install and
# exits 0: those tests then skip with the same advice.
set -euo pipefail
PKGS=(orthanc orthanc-dicomweb chromium chromium-driver)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-serve-deps: not root or no apt-get; install ${PKGS[*]} with your package manager" >&2
  exit 0
fi
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian package starts a system Orthanc on 8042/4242; tests start their own on free ports, so
# it is stopped by its pid file only (`service orthanc stop` would kill every Orthanc process,
# including a test's own).
if [ -f /run/orthanc.pid ]; then kill "$(cat /run/orthanc.pid)" 2>/dev/null || true; fi
echo "install-serve-deps: ${PKGS[*]} present"

#!/usr/bin/env bash
# The system packages `spinegrade serve`'s tests and local trial need: a real PACS (Orthanc with
# its DICOMweb plugin), a real browser (Chromium + chromedriver) for the page test, and the DICOM
# validator a PACS team runs on what we file (dicom3tools' dciodvfy).
# Run as root on Debian/Ubuntu (CI does, from .ci/run). Elsewhere it installs nothing and exits 0
# (a user's machine is not broken by it), but says loudly what is missing: the serve tests that
# need it then skip, and pytest's short summary (-ra) gives each skip's reason.
set -euo pipefail
PKGS=(orthanc orthanc-dicomweb chromium chromium-driver dicom3tools)
PLUGINS=(/usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so)

# What the tests look for (spinegrade.serve.orthanc, tests/test_serve.py), whoever installed it.
missing_now() {
  local out=() b
  for b in Orthanc chromium chromedriver dciodvfy; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
  [ -f "${PLUGINS[0]}" ] || [ -f "${PLUGINS[1]}" ] || out+=("the Orthanc DICOMweb plugin")
  echo "${out[*]-}"
}

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  missing="$(missing_now)"
  if [ -z "$missing" ]; then
    echo "install-serve-deps: not root or no apt-get, but Orthanc, its DICOMweb plugin," \
      "Chromium and dciodvfy are already here"
    exit 0
  fi
  {
    echo "install-serve-deps: WARNING: not root or no apt-get: installed nothing; missing: $missing"
    echo "install-serve-deps: WARNING: the serve tests that need them will be SKIPPED;" \
      "install ${PKGS[*]} with your package manager"
  } >&2
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

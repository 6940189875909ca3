#!/usr/bin/env bash
# What the test suite needs besides Python packages, on Debian or Ubuntu:
#   - Debian packages: dcmtk (storescu/storescp), dicom3tools (dciodvfy), Orthanc and
#     its DICOMweb plugin (the PACS), Chromium (the viewer test's browser), openssl;
#   - the viewer test's npm packages (tests/viewer/install.sh; Node.js and npm needed).
# Run as root, or as a user who may sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
packages="dcmtk dicom3tools orthanc orthanc-dicomweb chromium openssl"
if ! command -v npm >/dev/null; then packages="$packages nodejs npm"; fi
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # the list is meant to split
$SUDO apt-get install -y -qq $packages >/dev/null
tests/viewer/install.sh

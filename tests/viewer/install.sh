#!/usr/bin/env bash
# Install what the real-viewer test needs, from the npm registry:
#   - playwright-core (package-lock.json), which drives Debian's Chromium;
#   - OHIF's prebuilt viewer (@ohif/app's dist/), unpacked into ohif/.
# OHIF is fetched with `npm pack` rather than installed: the test serves its prebuilt
# dist/ and needs none of the ~1,500 packages it was built from. The tarball's sha512
# is checked against the registry's pinned integrity before it is unpacked.
set -euo pipefail
cd "$(dirname "$0")"

OHIF_VERSION="3.13.2"
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

if [ "$(cat ohif/VERSION 2>/dev/null)" != "$OHIF_VERSION" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    npm pack "@ohif/app@$OHIF_VERSION" --pack-destination "$work" --loglevel=error >/dev/null
    tarball="$work/ohif-app-$OHIF_VERSION.tgz"
    got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
    if [ "$got" != "$OHIF_INTEGRITY" ]; then
        echo "@ohif/app@$OHIF_VERSION: integrity mismatch ($got)" >&2
        exit 1
    fi
    tar -xzf "$tarball" -C "$work" package/dist
    rm -rf ohif
    mv "$work/package/dist" ohif
    echo "$OHIF_VERSION" > ohif/VERSION
fi

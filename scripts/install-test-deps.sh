#!/usr/bin/env bash
# System packages the tests need (Debian/Ubuntu): GStreamer's RTSP server (scripts/install-rtsp.sh),
# the Mosquitto broker for the MQTT tests (scripts/install-mosquitto.sh), chromium for the web
# station's browser tests (tests/test_web_browser.py drives it with Playwright; no browser is
# downloaded), iproute2 and redis-server for the split-site network tests (scripts/install-netns.sh),
# and docker-compose, used by tests/test_compose.py to validate the compose files
# offline with `docker-compose config -q` (no Docker engine is needed for that).
# Idempotent and quiet: does nothing when everything is already installed.
set -euo pipefail
"$(dirname "$0")/install-rtsp.sh"
"$(dirname "$0")/install-mosquitto.sh"
"$(dirname "$0")/install-chromium.sh"
"$(dirname "$0")/install-netns.sh"
if command -v docker-compose >/dev/null 2>&1; then
  echo "docker-compose already installed ($(docker-compose version --short 2>/dev/null || echo unknown))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or the package cannot be found.
if ! apt-cache show docker-compose >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
echo "installed: docker-compose $(docker-compose version --short 2>/dev/null || echo)"

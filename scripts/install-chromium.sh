#!/usr/bin/env bash
# Debian's chromium for the web station's browser tests (Playwright drives it by executable_path;
# `playwright install` is never run). Idempotent; a failure is reported, and the browser tests skip.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed ($(chromium --version 2>/dev/null || echo unknown))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
if $SUDO apt-get install -y -qq chromium >/dev/null; then
  echo "installed: $(chromium --version 2>/dev/null || echo chromium)"
else
  echo "chromium could not be installed: the browser tests will be skipped" >&2
fi

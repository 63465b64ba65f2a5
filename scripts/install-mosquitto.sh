#!/usr/bin/env bash
# Install Debian's Mosquitto broker (mosquitto, mosquitto_passwd) and openssl, used by the MQTT
# tests (tests/test_mqtt.py starts private brokers on free ports; the system service is not needed).
# Idempotent and quiet: does nothing when every package is already installed.
set -euo pipefail
PACKAGES=(mosquitto openssl)
missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "mosquitto already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"

#!/usr/bin/env bash
# Install Debian's Mosquitto broker (mosquitto, mosquitto_passwd) and openssl, used by the MQTT
# tests (tests/test_mqtt.py starts private brokers on free ports; the system service is not needed).
# Idempotent and quiet: does nothing when every package is already installed.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" mosquitto mosquitto openssl

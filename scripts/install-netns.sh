#!/usr/bin/env bash
# Install what the split-site network fault tests need (tests/test_faults_network.py): iproute2 (`ip netns`,
# veth pairs, `tc` tbf), Debian's redis-server (built with TLS) and openssl for the site's certificates.
# Idempotent and quiet: does nothing when every package is already installed.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "network namespace tools" iproute2 redis-server openssl

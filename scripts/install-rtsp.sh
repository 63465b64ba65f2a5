#!/usr/bin/env bash
# Install GStreamer's RTSP server and codecs (Debian/Ubuntu), used by the RTSP tests and demos.
# Idempotent and quiet: does nothing when every package is already installed.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" "GStreamer RTSP server" \
  gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav

"""A real RTSP server for tests and demos: GStreamer's gst-rtsp-server serving a test pattern or a file.

Run with the system Python, which has ``gi`` (``scripts/install-rtsp.sh`` installs the packages):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 [--file clip.mp4] [--user U --password P]

Serves ``rtsp://127.0.0.1:PORT/stream`` (H.264) and prints ``READY <port>`` once listening.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

TEST_PATTERN = (
    "videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={fps}/1 ! "
    "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96"
)
FILE = "filesrc location={path} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--file", help="H.264 MP4 to serve instead of the test pattern")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=int, default=18)
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    launch = FILE.format(path=args.file) if args.file else TEST_PATTERN.format(w=args.width, h=args.height, fps=args.fps)
    factory.set_launch(f"( {launch} )")
    factory.set_shared(True)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)
        perms = GstRtspServer.RTSPPermissions()
        perms.add_permission_for_role("user", "media.factory.access", True)
        perms.add_permission_for_role("user", "media.factory.construct", True)
        factory.set_permissions(perms)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {args.port}")
    print(f"READY {args.port}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()

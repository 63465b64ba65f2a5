"""fallwatch: edge-cloud fall detection for eldercare cameras (shared core package)."""

__version__ = "0.1.0"

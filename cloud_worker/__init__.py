"""fallwatch cloud_worker component."""

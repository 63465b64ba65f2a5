"""fallwatch alerts component."""

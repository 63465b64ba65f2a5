"""fallwatch ingest component."""

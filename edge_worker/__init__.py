"""fallwatch edge_worker component."""

"""fallwatch switcher component."""

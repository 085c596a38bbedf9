"""Marks client_js/ as the package data stream_server.web (see pyproject.toml); no Python here."""

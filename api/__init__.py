"""HTTP service, CLI and settings."""

"""Python client and CLI for the codelen API."""

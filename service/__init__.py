"""The HTTP layer: a thin FastAPI app over a backend (embedded engine or Redis queue)."""

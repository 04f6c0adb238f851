"""The HTTP API (FastAPI): the same `/v1/jobs` routes on every service."""

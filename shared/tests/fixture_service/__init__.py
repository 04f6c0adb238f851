"""A tiny service used by the shared core's tests: one fixture behaviour per failure mode."""

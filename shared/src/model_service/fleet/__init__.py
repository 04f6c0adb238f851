"""Fleets: many pods of one model sharing one job queue on Redis (QUEUE_URL)."""

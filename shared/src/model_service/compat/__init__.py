"""Other services' request and answer shapes, translated onto our jobs."""

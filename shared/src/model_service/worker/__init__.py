"""The model runs here: a spawned child process per worker, and its handle in the API."""

"""The echo service: a tiny service used by the shared core's tests, one fixture behaviour
per failure mode (`python -m model_service_testing.echo.serve`)."""

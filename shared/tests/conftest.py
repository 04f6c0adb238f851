"""The shared core's tests: the fixtures (`echo_service`, `comfy_standin`, `redis_server`,
`browser`, ...) come from the `model_service_testing` pytest plugin."""

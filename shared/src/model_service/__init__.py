"""model_service: the shared core every GPU model service stands on."""

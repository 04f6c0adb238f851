"""Qwen-Image-Edit service. `schema`, `manifest`, `service`, `legacy` run in the API
process (no torch); `predictor`, `pipeline_loader`, `tiny_model` only in the worker."""

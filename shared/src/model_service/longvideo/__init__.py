"""Long videos on an image-to-video service: chains of segments and travel between images,
run as job graphs (`model_service.jobs.graph`) and stitched into one mp4."""

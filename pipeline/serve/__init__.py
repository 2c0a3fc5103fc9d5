"""Ray Serve app for image -> mesh generation (``pipeline.serve.app``) and its settings."""

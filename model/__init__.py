"""Networks and math of the sparse-SDF image-to-3D system. Never imports Ray."""

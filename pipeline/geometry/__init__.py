"""Geometry shared by the stages: mesh loading and normalization, narrow-band sparse SDF, rendered views."""

"""Tiny FLUX-architecture models built locally from config objects (no download)."""

"""EliGen pipelines: thin diffusers subclasses, one per model family, on the shared core (:mod:`.common`)."""

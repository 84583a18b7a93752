"""The embedded default: the shapes world, the shipped tiny model's recipe, and ShapesBench (no download)."""

"""Training-data construction: parsing grounding vision-language model answers into EliGen entities."""

"""EliGen LoRA training: dataset, rectified-flow loss and trainer."""

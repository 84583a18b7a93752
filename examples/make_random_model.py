"""Build a tiny random FLUX pipeline directory (no download): `python examples/make_random_model.py OUT_DIR`."""

import sys
from pathlib import Path

from eligen.tiny.random_pipeline import save_tiny_flux_pipeline

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny-random-flux")
    if (out / "model_index.json").exists():
        print(f"model: {out} (already built)")
    else:
        print(f"model: {save_tiny_flux_pipeline(out)}")

"""COCO-MIG's OpenCV steps, reproduced in numpy by eligen, checked against OpenCV itself (docs/design.md section 13).

MIG-Bench's eval_mig.py converts 8-bit BGR to HSV and resizes every image to 512x512 with OpenCV. eligen does both
without OpenCV (eligen.evals.colour.rgb_to_hsv8, eligen.evals.resample.resize_like_opencv); this script compares
them with cv2 on every 8-bit colour and on random and smooth images of the sizes generators make, and says how often
eval_mig.py's active HSV table and the commented-out older one disagree. OpenCV is not an eligen dependency:

    pip install opencv-python-headless && python benchmarks/cocomig_opencv_check.py
"""

from __future__ import annotations

import numpy as np

from eligen.evals.colour import HSV_RANGES, colour_mask, rgb_to_hsv8
from eligen.evals.resample import resize_like_opencv

# eval_mig.py's commented-out table (not used by the benchmark), for the comparison only
OLDER_TABLE = {"red": [((0, 43, 35), (6, 255, 255)), ((156, 43, 35), (180, 255, 255))],
               "blue": [((78, 43, 35), (124, 255, 255))], "green": [((35, 43, 35), (77, 255, 255))],
               "yellow": [((20, 43, 35), (34, 255, 255))], "black": [((0, 0, 0), (180, 255, 35))],
               "white": [((0, 0, 221), (180, 43, 255))], "brown": [((6, 43, 35), (25, 255, 255))]}
SIZES = [(1024, 1024), (1328, 1328), (768, 768), (1024, 768), (640, 480), (513, 700), (300, 300), (64, 64)]


def every_colour() -> np.ndarray:
    v = np.arange(256, dtype=np.uint8)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    return np.stack([r, g, b], axis=-1).reshape(4096, 4096, 3)


def check_hsv(cv2) -> np.ndarray:
    rgb = every_colour()
    ours = rgb_to_hsv8(rgb)
    ref = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2HSV).astype(np.int64)
    print(f"HSV: {int((ours != ref).any(axis=-1).sum())} of {rgb.shape[0] * rgb.shape[1]} colours differ from cv2")
    return ref


def check_tables(hsv: np.ndarray, rgb: np.ndarray) -> None:
    for colour, ranges in OLDER_TABLE.items():
        older = np.zeros(hsv.shape[:-1], dtype=bool)
        for low, high in ranges:
            older |= np.all((hsv >= low) & (hsv <= high), axis=-1)
        share = (older != colour_mask(rgb, colour)).mean() * 100
        print(f"{colour:6s}: the active and the older table disagree on {share:.2f}% of RGB colours "
              f"(active {HSV_RANGES[colour]})")


def check_resize(cv2) -> None:
    rng = np.random.default_rng(0)
    for height, width in SIZES:
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + yy) % 256], -1).astype(np.uint8)
        for name, image in (("noise", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), ("smooth", smooth)):
            diff = np.abs(cv2.resize(image, (512, 512)).astype(int) - resize_like_opencv(image, 512, 512).astype(int))
            print(f"resize {width}x{height} -> 512x512 ({name}): {int((diff > 0).sum())} of {diff.size} values "
                  f"differ from cv2, by at most {int(diff.max())}")


def main() -> None:
    import cv2

    print(f"OpenCV {cv2.__version__}")
    check_tables(check_hsv(cv2), every_colour())
    check_resize(cv2)


if __name__ == "__main__":
    main()

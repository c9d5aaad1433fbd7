"""The bundled model's held-out evaluation sets as image + mask folders, the format
`sam-jax eval points --data NAME=masks:IMAGES,MASKS` reads.

    python experiments/heldout_folders.py --data ../shared/data --out runs/heldout
    sam-jax eval points --data davis=masks:runs/heldout/davis/images,runs/heldout/davis/masks ...

The sets are exactly `evaluate_default_model.py`'s (`heldout_sets`: every 3rd frame of the
held-out DAVIS sequences, the 48 held-out horses, the 100 held-out clothing photos as whole
people, and the parts of the first 25 of them), so the command's numbers can be checked
against that script's. Images are symlinked; masks are written as PNG label maps (0 background,
one value per object).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/heldout")
    args = parser.parse_args(argv)

    from evaluate_default_model import heldout_sets

    sets = heldout_sets(args.data, None, parts_photos=25, davis_stride=3)
    for name, examples in sets.items():
        images = os.path.join(args.out, name, "images")
        masks = os.path.join(args.out, name, "masks")
        os.makedirs(images, exist_ok=True)
        os.makedirs(masks, exist_ok=True)
        for item, image, objects in examples:
            stem = item["name"].replace("/", "_")
            link = os.path.join(images, stem + os.path.splitext(item["image"])[1])
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(item["image"]), link)
            if len(objects) > 255:
                raise ValueError(f"{stem}: {len(objects)} objects do not fit an 8-bit map")
            label = np.zeros(image.shape[:2], np.uint8)
            for value, mask in enumerate(objects, start=1):
                if (label[mask] != 0).any():
                    raise ValueError(f"{stem}: objects overlap; a label map cannot hold them")
                label[mask] = value
            Image.fromarray(label).save(os.path.join(masks, stem + ".png"))
        print(f"{name}: {len(examples)} images, {sum(len(o) for _, _, o in examples)} objects "
              f"-> {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

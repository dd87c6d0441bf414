"""How much BLEU a smaller image size costs, by the height of the formula's ink at full size:
two evaluations of the same images (eval's predictions.json, say one at --image-scale 0.5 and one
at 1x), grouped by the ink height of each image as it is stored.

    python scripts/size_gap.py half/predictions.json full/predictions.json IMAGE_BASE_DIR
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import latexocr  # noqa: E402

# (label, lowest, highest ink px); up to 24 px is at most data.min_ink_height at half size.
GROUPS = (("0-24", 0, 24), ("25-32", 25, 32), (">= 33", 33, math.inf), ("all", 0, math.inf))


def answers(path: str) -> dict[str, tuple[list[str], list[str]]]:
    rows = json.load(open(path))["predictions"]
    return {row["name"]: (row["reference"].split(), row["prediction"].split()) for row in rows}


def main(scaled_path: str, full_path: str, image_base_dir: str) -> None:
    scaled, full = answers(scaled_path), answers(full_path)
    names = [name for name in scaled if name in full]
    heights = {name: latexocr.ink_crop(latexocr.open_image(Path(image_base_dir) / name)).shape[0] for name in names}
    print(f"{'ink height (px)':<16}{'images':>7}{'BLEU scaled':>13}{'BLEU full':>11}{'gap':>7}")
    for label, low, high in GROUPS:
        group = [name for name in names if low <= heights[name] <= high]
        if not group:
            continue
        references = [scaled[name][0] for name in group]
        bleu_scaled = latexocr.bleu4(references, [scaled[name][1] for name in group])
        bleu_full = latexocr.bleu4(references, [full[name][1] for name in group])
        print(f"{label:<16}{len(group):7d}{bleu_scaled:13.2f}{bleu_full:11.2f}{bleu_full - bleu_scaled:7.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Parameters and multiply-adds per stage, beside the published figures.

    python -m shunted_jax.tools.summary --model shunted_s [--image-size 224] [--set attention=sra]
"""
import argparse
import re
from typing import Dict, List

import jax
import numpy as np

from shunted_jax import models
from shunted_jax.models.flops import abstract_variables, count_macs

# (params in millions, GMACs at 224x224) as published: the Shunted paper / README and the PVT
# README (whose "GFLOPs" are multiply-adds).
PUBLISHED = {
    "shunted_t": (11.5, 2.1),
    "shunted_s": (22.4, 4.9),
    "shunted_b": (39.6, 8.1),
    "pvt_v2_b0": (3.7, 0.6),
    "pvt_v2_b1": (14.0, 2.1),
    "pvt_v2_b2": (25.4, 4.0),
    "pvt_v2_b2_li": (22.6, 3.9),
    "pvt_v2_b3": (45.2, 6.9),
    "pvt_v2_b4": (62.6, 10.1),
    "pvt_v2_b5": (82.0, 11.8),
}

_STAGE_KEY = re.compile(r"(?:patch_embed|block|norm)(\d)$")


def params_per_part(params) -> Dict[str, int]:
    """Parameter count of each stage (its patch embed, blocks and norm) and of the head."""
    counts: Dict[str, int] = {}
    for key, subtree in params.items():
        match = _STAGE_KEY.match(key)
        part = f"stage{match.group(1)}" if match else key
        counts[part] = counts.get(part, 0) + sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(subtree))
    return counts


def summarize(model, image_hw=(224, 224)) -> List[dict]:
    """One row per stage, the head and the total: params and MACs split by kind."""
    variables = abstract_variables(model, image_hw)
    counts = params_per_part(variables["params"])
    macs = count_macs(model, image_hw, variables)
    stages = [f"stage{i}" for i in range(1, 5) if f"stage{i}" in counts]
    parts = stages + sorted(set(counts) - set(stages))  # the head, and e.g. a ViT's position embedding
    rows = [dict(part=p, params=counts.get(p, 0), **macs.get(p, dict(conv=0, linear=0, attention=0, all=0)))
            for p in parts]
    rows.append(dict(part="total", params=sum(counts.values()), **macs["total"]))
    return rows


def format_table(rows: List[dict], grids) -> str:
    header = f"{'part':<8}{'grid':>9}{'params':>14}{'conv GMAC':>11}{'linear':>9}{'attn':>8}{'total':>9}"
    lines = [header, "-" * len(header)]
    for row, grid in zip(rows, list(grids) + [None] * (len(rows) - len(grids))):
        shown = f"{grid[0]}x{grid[1]}" if grid else ""
        lines.append(
            f"{row['part']:<8}{shown:>9}{row['params']:>14,}{row['conv'] / 1e9:>11.4f}"
            f"{row['linear'] / 1e9:>9.4f}{row['attention'] / 1e9:>8.4f}{row['all'] / 1e9:>9.4f}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.list_models())
    parser.add_argument("--image-size", type=int, nargs="+", default=[224], help="H [W]")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model field overrides")
    args = parser.parse_args(argv)
    image_hw = (args.image_size[0], args.image_size[-1])
    model = models.create(args.model, **models.parse_overrides(args.set))
    rows = summarize(model, image_hw)
    print(f"{args.model} at {image_hw[0]}x{image_hw[1]} (MACs per image, counted like torch's flop counter / 2)")
    print(format_table(rows, model.stage_grids(*image_hw)))
    if args.model in PUBLISHED and not args.set and image_hw == (224, 224):
        params_m, gmacs = PUBLISHED[args.model]
        total = rows[-1]
        print(f"published: {params_m} M params, {gmacs} GMACs; "
              f"here: {total['params'] / 1e6:.2f} M, {total['all'] / 1e9:.3f} GMACs")


if __name__ == "__main__":
    main()

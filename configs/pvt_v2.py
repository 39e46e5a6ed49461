"""PVTv2 B0-B5 on ImageNet-1k with the official recipe; pick the variant with the argument.

    python train.py --config configs/pvt_v2.py:variant=b2 --workdir DIR
        300 epochs at global batch 1024; the paper reports 82.0% top-1 for B2 (b0 70.5, b1 78.7,
        b2_li 82.1, b3 83.2, b4 83.6, b5 83.8).
"""
from configs import common

# (drop path rate, gradient clipping norm) of the official PVTv2 configs; 0 = no clipping.
VARIANTS = {"b0": (0.1, 0.0), "b1": (0.1, 0.0), "b2": (0.1, 0.0), "b2_li": (0.1, 0.0),
            "b3": (0.3, 1.0), "b4": (0.3, 1.0), "b5": (0.3, 1.0)}


def get_config(arg=None):
    variant = common.parse_arg(arg, __file__, variant=tuple(VARIANTS)).variant
    drop_path_rate, grad_clip_norm = VARIANTS[variant]
    config = common.imagenet_config(f"pvt_v2_{variant}", drop_path_rate=drop_path_rate,
                                    grad_clip_norm=grad_clip_norm)
    config.lock()
    return config

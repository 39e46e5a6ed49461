"""Shunted-S (22.4M parameters) on ImageNet-1k with the official recipe.

    python train.py --config configs/shunted_s.py --workdir DIR
        300 epochs at global batch 1024; the paper reports 82.9% top-1 (224x224).
"""
from configs import common


def get_config(arg=None):
    common.parse_arg(arg, __file__)  # one variant, no demo
    config = common.imagenet_config("shunted_s", drop_path_rate=0.2)
    config.lock()
    return config

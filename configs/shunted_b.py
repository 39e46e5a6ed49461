"""Shunted-B (39.6M parameters) on ImageNet-1k with the official recipe (gradients clipped at 1.0).

    python train.py --config configs/shunted_b.py --workdir DIR
        300 epochs at global batch 1024; the paper reports 84.0% top-1 (224x224).
"""
from configs import common


def get_config(arg=None):
    common.parse_arg(arg, __file__)  # one variant, no demo
    config = common.imagenet_config("shunted_b", drop_path_rate=0.3, grad_clip_norm=1.0)
    config.lock()
    return config

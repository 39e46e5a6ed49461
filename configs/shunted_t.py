"""Shunted-T (11.5M parameters) on ImageNet-1k with the official recipe.

    python train.py --config configs/shunted_t.py --workdir DIR
        300 epochs at global batch 1024; the paper reports 79.8% top-1 (224x224).
    python train.py --config configs/shunted_t.py:demo --workdir /tmp/demo
        Fashion-MNIST demo at 32x32, one epoch: about 87% top-1 in minutes on 2 CPU cores
        (docs/training.md, "The demo", has the measured figure).
"""
from configs import common

# Narrow FFNs: XLA:CPU computes depthwise-convolution weight gradients slowly, and they dominate.
DEMO_MODEL = {"embed_dims": (16, 32, 64, 96), "depths": (1, 1, 1, 1), "num_heads": (2, 2, 2, 2),
              "mlp_ratios": (2, 2, 2, 2)}


def get_config(arg=None):
    args = common.parse_arg(arg, __file__, demo=False)
    config = common.imagenet_config("shunted_t", drop_path_rate=0.1)
    if args.demo:
        common.to_demo(config, DEMO_MODEL)
    config.lock()
    return config

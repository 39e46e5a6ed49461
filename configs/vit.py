"""A single-scale ViT baseline (16x16 patchify, plain attention) with the same recipe as Shunted.

    python train.py --config configs/vit.py:variant=ti16 --workdir DIR
        ViT-Ti/16 (DeiT-Ti's shape, mean-pooled) on ImageNet-1k, 300 epochs at global batch 1024.
    python train.py --config configs/vit.py:demo --workdir /tmp/vit_demo
        The Fashion-MNIST demo at 32x32 with 8x8 patches (a 4x4 grid: coarse next to the pyramid's
        8x8 first stage) and a parameter count near the Shunted demo's; the ablations' baseline.
"""
from configs import common

VARIANTS = {"ti16": 0.1, "s16": 0.1}  # drop path rate, as DeiT-Ti / DeiT-S
DEMO_MODEL = {"embed_dim": 96, "depth": 3, "num_heads": 2, "mlp_ratio": 2, "patch_size": 8}


def get_config(arg=None):
    args = common.parse_arg(arg, __file__, variant=tuple(VARIANTS), demo=False)
    config = common.imagenet_config(f"vit_{args.variant}", drop_path_rate=VARIANTS[args.variant])
    if args.demo:
        common.to_demo(config, DEMO_MODEL)
    config.lock()
    return config

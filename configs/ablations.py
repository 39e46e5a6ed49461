"""The attention ablations: seven designs trained on one budget (docs/ablations.md).

    python -m shunted_jax.tools.ablate --setting demo --out /tmp/ablations
    notebooks/ablations.ipynb

Data only. A variant is a training config file (what `train.py --config` takes) and overrides of
its fields; a setting is the budget every variant shares (image size, steps, batch, evaluation),
applied on top. Field names are dotted as on train.py's command line ("model.attention").

Why 64 px: the pyramid's stage grids are the image side / 4, 8, 16, 32. At 32 px (the plain demo)
they are 8/4/2/1, so Shunted's rate-8 group in stage 1 pools the whole map into one key and
attends to nothing but a global average. At 64 px (grids 16/8/4/2) every rate of every variant
leaves at least a 2x2 key grid in stages 1-3, so the scales differ in what they see.
"""

PYRAMID = "configs/shunted_t.py:demo"
VIT = "configs/vit.py:demo"

# The demo's Shunted-T shape with widths divisible by 2 and 3, so that the same model splits its
# heads into two or three scale groups; 0.31 M parameters.
PYRAMID_MODEL = {"model.embed_dims": (18, 36, 72, 96)}
# Three scales where the grid allows (stages 1-2), two in stage 3, global attention in stage 4;
# one head per scale, as Shunted-T's stage 1.
THREE_SCALES = {"model.num_heads": (3, 3, 2, 2), "model.ssa_rates": ((8, 4, 2), (4, 2, 1), (2, 1), (1,))}

VARIANTS = (
    {"label": "ssa", "config": PYRAMID, "overrides": PYRAMID_MODEL,
     "description": "Shunted self-attention as published: two head groups per stage with keys/values "
                    "aggregated at rates (8, 4), (4, 2), (2, 1), then global attention in stage 4."},
    {"label": "sra", "config": PYRAMID, "overrides": {**PYRAMID_MODEL, "model.attention": "sra"},
     "description": "PVT's spatial-reduction attention: all heads attend to one key grid, reduced by "
                    "a stride-r conv at r = 8, 4, 2, 1."},
    {"label": "ssa_3scale", "config": PYRAMID, "overrides": {**PYRAMID_MODEL, **THREE_SCALES},
     "description": "SSA with three head groups at rates (8, 4, 2) and (4, 2, 1) in stages 1-2, "
                    "(2, 1) in stage 3; 3, 3, 2, 2 heads."},
    {"label": "ssa_1scale", "config": PYRAMID,
     "overrides": {**PYRAMID_MODEL, "model.ssa_rates": ((8,), (4,), (2,), (1,))},
     "description": "SSA with a single group per stage at PVT's rates 8, 4, 2, 1: SSA's key "
                    "aggregation (conv, LayerNorm, GELU, local enhancement of V) without the split."},
    {"label": "plain_ffn", "config": PYRAMID, "overrides": {**PYRAMID_MODEL, "model.ffn": "plain"},
     "description": "The official SSA with the transformer MLP instead of the detail-specific FFN "
                    "(no depthwise conv branch)."},
    {"label": "aggregator", "config": PYRAMID, "overrides": {**PYRAMID_MODEL, "model.attention": "aggregator"},
     "description": "Multi-scale token aggregator: every SSA rate of a stage gets all the heads; the "
                    "branch outputs are concatenated and projected by one linear layer."},
    {"label": "vit", "config": VIT, "overrides": {"model.patch_size": 16},
     "description": "Single-scale baseline: 16x16 patchify (a 4x4 token grid at 64 px), learned "
                    "position embedding, plain attention and MLP; parameters matched (0.30 M)."},
)

# Evaluations fall on log steps, and a log interval that contains one (or the first compile) is
# left out of the throughput, so log more often than you evaluate.
SETTINGS = {
    # What the tests execute: compile-bound, so as little else as will do. The fewest steps that
    # leave two log intervals free of the compile and of the one evaluation, at the end; small
    # batches, and a training split of a few batches (no 10,000-image shuffle buffer to fill).
    "small": {"data.image_size": 64, "data.train_split": "train[:64]", "evals.val.split": "test[:16]",
              "global_batch_size": 8, "eval_batch_size": 16, "num_train_steps": 3,
              "optimizer.warmup_steps": 1, "log_every_steps": 1, "evals.val.every_steps": 3,
              "checkpoint.every_steps": 1000},
    # 2 CPU cores, 22 minutes for all seven: 12,800 images (a fifth of an epoch) each, at the demo's
    # peak learning rate (2e-3). Small batches: on a CPU they train more images per second.
    "demo": {"data.image_size": 64, "global_batch_size": 32, "eval_batch_size": 1000,
             "num_train_steps": 400, "optimizer.base_lr": 0.032, "optimizer.warmup_steps": 40,
             "log_every_steps": 10, "evals.val.every_steps": 100, "checkpoint.every_steps": 1000},
    # A GPU / TPU runtime: 10 epochs at 96 px (grids 24/12/6/3) on every test image.
    "full": {"data.image_size": 96, "global_batch_size": 256, "eval_batch_size": 1000,
             "num_epochs": 10.0, "optimizer.warmup_epochs": 0.5, "log_every_steps": 50,
             "evals.val.every_epochs": 1.0, "checkpoint.every_steps": 2000},
}

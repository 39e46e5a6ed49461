"""The official Shunted Transformer variants (Shunted-T/S/B): SSA, detail-specific FFN, conv stem."""

SHUNTED_COMMON = dict(
    embed_dims=(64, 128, 256, 512),
    num_heads=(2, 4, 8, 16),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
    attention="ssa",
    ffn="detail",
    stem="conv",
)

VARIANTS = {
    "shunted_t": dict(SHUNTED_COMMON, depths=(1, 2, 4, 1), num_conv=0),
    "shunted_s": dict(SHUNTED_COMMON, depths=(2, 4, 12, 1), num_conv=1),
    "shunted_b": dict(SHUNTED_COMMON, depths=(3, 4, 24, 2), num_conv=2),
}

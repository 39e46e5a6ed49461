"""The official PVTv2 variants (b0-b5, b2-li): spatial-reduction attention, PVTv2 FFN, 7x7/4 patch stem."""

PVT_V2_COMMON = dict(
    embed_dims=(64, 128, 320, 512),
    num_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
    attention="sra",
    ffn="pvt",
    stem="patch",
)

VARIANTS = {
    "pvt_v2_b0": dict(PVT_V2_COMMON, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": dict(PVT_V2_COMMON, depths=(2, 2, 2, 2)),
    "pvt_v2_b2": dict(PVT_V2_COMMON, depths=(3, 4, 6, 3)),
    "pvt_v2_b2_li": dict(PVT_V2_COMMON, depths=(3, 4, 6, 3), attention="linear_sra", ffn="pvt_linear"),
    "pvt_v2_b3": dict(PVT_V2_COMMON, depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(PVT_V2_COMMON, depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(PVT_V2_COMMON, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}

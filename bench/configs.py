"""UNet2DConditionModel configurations used by the benchmarks (helper module, not a script; random
weights: speed and FLOPs do not depend on the weights). "sd15" and "sdxl" are the real model
layouts. Standard library only (the scripts' --help needs no torch)."""
from __future__ import annotations

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, cross_attention_dim=2048, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

# SD1.5's layout at a width a 2-core CPU runs in seconds per generation.
SMALL = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 128, 192, 192),
    down_block_types=SD15["down_block_types"], up_block_types=SD15["up_block_types"],
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)

CONFIGS = {"sd15": SD15, "sdxl": SDXL, "small": SMALL}
# text length, pooled width (SDXL) per config
TEXT = {"sd15": (77, None), "sdxl": (77, 1280), "small": (16, None)}

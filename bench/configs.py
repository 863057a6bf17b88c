"""UNet configurations used by the benchmarks (helper module, not a script; random
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

# Video UNets at a size a CPU runs in seconds (random weights; bench/latency.py --config): the
# family's model class, its config, the motion adapter's (AnimateDiff), frames per video.
# AnimateDiff's text states are repeated per frame by its pipeline (text_per_frame).
VIDEO_CONFIGS = {
    "animatediff": dict(
        model="UNetMotionModel", frames=8, text_per_frame=True,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8),
        adapter=dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                     motion_num_attention_heads=(2, 4), motion_max_seq_length=16, use_motion_mid_block=True)),
    "t2v": dict(
        model="UNet3DConditionModel", frames=8, text_per_frame=False,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)),
    # Stable Video Diffusion: sample (batch, frames, 4 noise + 4 image-latent channels, H, W), one
    # image-embedding token for text, added_time_ids (fps - 1, motion bucket, noise augmentation)
    "svd": dict(
        model="UNetSpatioTemporalConditionModel", frames=8, text_per_frame=False, image_channels=4,
        unet=dict(sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                  up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                  num_attention_heads=(2, 4), cross_attention_dim=32, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24, num_frames=8)),
}
# text length, pooled width (SDXL) per config
TEXT = {"sd15": (77, None), "sdxl": (77, 1280), "small": (16, None), "animatediff": (16, None), "t2v": (16, None),
        "svd": (1, None)}

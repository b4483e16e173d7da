"""The analytic FLOP count (used for MFU) against torch.utils.flop_counter on the tiny DLC model."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from one4d_train.model.attention import set_attention_backend
from one4d_train.model.backbone import WanDiT
from one4d_train.model.config import ModelConfig
from one4d_train.model.flops import FlopShape, model_flops_per_sample, training_flops_per_sample
from one4d_train.model.one4d import One4DModel
from one4d_train.model.presets import IMAGE_TOKENS, wan_config


def reference_figures(preset: str) -> float:
    """The peer baseline's count at One4D's shape (shared LoRA on diffusers' to_q/to_k/to_v/to_out.0 of both
    attentions + ffn, batch of 2, no image tokens): the figures quoted for it are 0.63 / 3.71 PFLOP."""
    c = wan_config(preset, has_image_input=False)
    shape = FlopShape(dim=c.dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers, tokens=21 * 22 * 39)
    targets = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    return training_flops_per_sample(shape, lora_rank=64, lora_targets=targets, xyz_patch_embedding=False)


@pytest.mark.parametrize("preset,pflop", [("1.3b", 0.63), ("14b", 3.71)])
def test_matches_quoted_peer_figures(preset, pflop):
    assert reference_figures(preset) / 1e15 == pytest.approx(pflop, rel=0.01)


@pytest.mark.parametrize("design,links", [("dlc", {"num_links": 2}), ("dlc", {"link_blocks": [0, 1]}),
                                          ("dlc", {"num_links": 2, "xyz_patch_embedding": False}),
                                          ("channel_concat", {}), ("width_concat", {})])
def test_analytic_count_matches_flop_counter(design, links):
    """The count the trainer logs (model_flops_per_sample) against the operations the model runs, per design;
    explicit link blocks count as many links as they name (num_links is then ignored, as by the model)."""
    set_attention_backend("math")  # unfused attention: backward = 2x forward, no recompute
    cfg = ModelConfig(preset="tiny", design=design, num_links=links.get("num_links", 5),
                      link_blocks=links.get("link_blocks", []),
                      xyz_patch_embedding=links.get("xyz_patch_embedding", True), activation_checkpointing="none",
                      compute_dtype="fp32")
    cfg.lora.rank = 4
    wc = wan_config("tiny")
    torch.manual_seed(0)
    base = WanDiT(wc)
    base.init_weights()
    model = One4DModel(base, cfg)
    B, T, H, W = 1, 3, 8, 12
    rgb_in = torch.randn(B, 36, T, H, W)
    xyz_in = torch.randn(B, 16, T, H, W)
    context = torch.randn(B, wc.text_len, wc.text_dim)
    clip = torch.randn(B, IMAGE_TOKENS, wc.image_dim)
    t = torch.rand(B) * 1000
    try:
        with FlopCounterMode(display=False) as counter:
            v_rgb, v_xyz = model(rgb_in, xyz_in, t, context, clip)
            (v_rgb.square().mean() + v_xyz.square().mean()).backward()
    finally:
        set_attention_backend("auto")
    counts = counter.get_flop_counts()
    # the analytic count leaves out the embedding MLPs of time, text and image (run once per sample, no
    # gradient; ~1% at the training shape, several % at this toy one): the rest must match it exactly, since at
    # this toy shape (512 text tokens against 72 video tokens) a dropped head, link or LoRA term is < 0.2%
    mlps = sum(sum(counts[f"One4DModel.base.{m}"].values())
               for m in ("time_embedding", "time_projection", "text_embedding", "img_emb"))
    measured = counter.get_total_flops() - mlps
    predicted = model_flops_per_sample(cfg, wc, T * (H // 2) * (W // 2), image_tokens=IMAGE_TOKENS,
                                       attention_backward_factor=2.0) * B
    assert measured == predicted, (measured, predicted)


def test_explicit_link_blocks_are_counted():
    wc = wan_config("1.3b")
    counts = [model_flops_per_sample(ModelConfig(preset="1.3b", **kw), wc, 18018, image_tokens=IMAGE_TOKENS)
              for kw in ({"num_links": 2}, {"num_links": 5, "link_blocks": [3, 10]}, {"num_links": 5})]
    assert counts[0] == counts[1] < counts[2]

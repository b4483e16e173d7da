"""Parameter accounting: the paper's One4D-14B figures, reproduced on the meta device."""

from one4d_train.model.config import LoRAConfig, ModelConfig
from one4d_train.model.one4d import build_one4d
from one4d_train.model.params import MEBI, count_parameters, format_report

PER_BLOCK_LORA_14B = 8_978_432  # rank 64 on the 12 block linears of a dim-5120, FFN-13824 block


def test_14b_i2v_reproduces_the_paper_figures():
    model = build_one4d(ModelConfig(preset="14b"), device="meta")
    assert model.link_blocks == [4, 12, 20, 28, 36]
    counts = count_parameters(model)
    assert counts["lora.rgb"] == counts["lora.xyz"] == 40 * PER_BLOCK_LORA_14B
    assert counts["lora"] == 2 * 40 * PER_BLOCK_LORA_14B
    links = 5 * 2 * 5120 ** 2
    xyz_embedding = 5120 * 36 * 1 * 2 * 2 + 5120
    assert counts["links"] == links + xyz_embedding
    assert counts["trainable"] == counts["lora"] + counts["links"]
    assert round(counts["lora"] / MEBI, 1) == 685.0
    assert round(links / MEBI, 1) == 250.0
    assert round(xyz_embedding / MEBI, 1) == 0.7
    assert round(counts["links"] / MEBI, 1) == 250.7
    assert round(counts["trainable"] / MEBI, 1) == 935.7
    # link biases would make the links group 250.8M: the links are bias-free
    assert round((counts["links"] + 5 * 2 * 5120) / MEBI, 1) == 250.8
    assert not any(n.startswith("control_links.") and n.endswith("bias") for n, _ in model.named_parameters())
    assert all(p.is_meta for p in model.parameters())
    report = format_report(counts)
    for line in ("lora.rgb", "342.5M", "685.0M", "250.7M", "935.7M"):
        assert line in report


def test_t2v_backbone_skips_image_projections():
    cfg = ModelConfig(preset="1.3b", has_image_input=False, lora=LoRAConfig(rank=16))
    counts = count_parameters(build_one4d(cfg, device="meta"))
    dim, ffn = 1536, 8960
    per_block = 16 * (8 * (dim + dim) + 2 * (dim + ffn))  # no k_img / v_img
    assert counts["lora.rgb"] == counts["lora.xyz"] == 30 * per_block
    assert counts["links"] == 5 * 2 * dim * dim + dim * 36 * 4 + dim


def test_ablation_groups_on_meta():
    shared = count_parameters(build_one4d(ModelConfig(preset="14b", design="width_concat"), device="meta"))
    assert shared["lora.shared"] == 40 * PER_BLOCK_LORA_14B and shared["trainable"] == shared["lora.shared"]
    concat = count_parameters(build_one4d(ModelConfig(preset="14b", design="channel_concat"), device="meta"))
    io = 5120 * 52 * 4 + 5120 + (5120 * 128 + 128)  # widened patch embedding + widened head
    assert concat["io"] == io and concat["trainable"] == 40 * PER_BLOCK_LORA_14B + io
    assert concat["base"] == shared["base"] - (5120 * 36 * 4 + 5120) - (5120 * 64 + 64)

"""Model configuration (the `model.` subtree): backbone, encoders, DLC and UMC."""
from __future__ import annotations

from dataclasses import dataclass, field

from one4d_train.configtools import choice, in_range


# every linear of a Wan2.1 block, by its official name (k_img/v_img exist only with image cross-attention)
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
)
# activation checkpointing: what each block keeps for backward, and the region one checkpoint covers
# (model/checkpointing.py)
CHECKPOINT_MODES = ("none", "full", "selective", "selective_self")
CHECKPOINT_UNITS = ("block", "sublayer", "sublayer_ffn")
LORA_KERNELS = ("bmm", "fused")  # the branch LoRA's deltas added after the base GEMMs, or in them (model/dlc.py)
OFFLOAD_MIN_MIB = 16.0  # activation offload: smaller saved tensors cost more in copies than they free


@dataclass
class LoRAConfig:
    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # block linears that carry the branch adapters

    def validate(self):
        p = in_range(self.rank, 1, None, "rank") + in_range(self.dropout, 0.0, 1.0, "dropout")
        p += in_range(self.alpha, 1e-6, None, "alpha")  # the delta's scale alpha/rank: 0 stops both adapter gradients
        unknown = [t for t in self.targets if t not in BLOCK_LINEARS]
        if unknown or not self.targets:
            p.append(("targets", f"must name Wan2.1 block linears among {list(BLOCK_LINEARS)}, got "
                      f"{list(self.targets)}" + (f" (unknown: {unknown})" if unknown else "")))
        return p


@dataclass
class UMCConfig:
    p_image: float = 0.35  # single image -> 4D
    p_sparse: float = 0.30  # sparse frames -> 4D
    p_video: float = 0.35  # full video -> 4D (reconstruction)
    sparse_min_frac: float = 0.1  # fraction of frames observed in the sparse task, drawn uniformly in [min, max]
    sparse_max_frac: float = 0.5
    text_dropout: float = 0.1  # probability of the empty prompt (classifier-free guidance)

    def validate(self):
        p = []
        total = self.p_image + self.p_sparse + self.p_video
        if abs(total - 1.0) > 1e-6 or min(self.p_image, self.p_sparse, self.p_video) < 0:
            p.append(("p_image", f"task probabilities must be >= 0 and sum to 1, got {total}"))
        if not 0 < self.sparse_min_frac <= self.sparse_max_frac <= 1:
            p.append(("sparse_min_frac", "need 0 < sparse_min_frac <= sparse_max_frac <= 1"))
        p += in_range(self.text_dropout, 0.0, 1.0, "text_dropout")
        return p


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | 1.3b | 14b (architecture sizes; see model/backbone presets)
    has_image_input: bool = True  # I2V image cross-attention (k_img/v_img + image projection)
    checkpoint: str = ""  # Wan2.1 DiT weights: official/Fun safetensors (file, shard index or folder) or a diffusers folder; empty = random init
    # a new run's adapters and control links start from these (an export, a complete checkpoint or a run directory's
    # newest) instead of zero-initialised ones: same model settings and base; fresh optimizer; a resume ignores it
    init_adapters: str = ""
    vae: str = ""  # diffusers AutoencoderKLWan folder, official Wan2.1_VAE.pth (or as .safetensors); empty = tiny random VAE
    text_encoder: str = ""  # UMT5 encoder folder (transformers); empty = precomputed embeddings from the shards, else the empty prompt
    text_encoder_device: str = "auto"  # auto = host memory when the training shards store the captions' embeddings from this text_encoder (`one4d encode-latents` records it in index.json; 11.4 GB of bf16 off the GPU), else the training device; cpu = always host memory; device = always the training device
    tokenizer: str = ""
    empty_prompt_embedding: str = ""  # .npy [L, D] UMT5 embedding of "" (taken over the encoder's own); empty = the encoder's, or zeros without one
    image_encoder: str = ""  # CLIP vision folder (transformers)
    attention: str = "auto"  # auto | fa4 | fa3 | fa2 | cudnn | flash | efficient | math
    design: str = "dlc"  # dlc | channel_concat | width_concat (ablations (a) and (b) share one LoRA)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    link_blocks: list[int] = field(default_factory=list)  # blocks followed by control links; empty = num_links evenly spaced
    num_links: int = 5
    xyz_patch_embedding: bool = True  # the XYZ branch's own trainable patch embedding (from the base's)
    activation_checkpointing: str = "full"  # none | full | selective | selective_self (model/checkpointing.py)
    activation_checkpointing_blocks: int = -1  # the first N blocks checkpointed as above, the rest keep every activation; -1 = all
    activation_checkpointing_unit: str = "block"  # block | sublayer: each residual update its own region | sublayer_ffn: and the FFN's hidden layer kept (model/checkpointing.py) | auto: the finest whose offloaded activations fit the node's host memory (model/offload_plan.py)
    activation_offload: bool = False  # saved block activations (>= activation_offload_min_mib each) in pinned host memory until backward
    activation_offload_blocks: int = -1  # the first N blocks' activations offloaded, the last ones' (read first in backward) kept on the GPU; -1 = all
    activation_offload_min_mib: float = OFFLOAD_MIN_MIB  # smallest saved tensor offloaded
    compute_dtype: str = "bf16"  # bf16 | fp32
    lora_kernel: str = "bmm"  # bmm | fused: the branch LoRA's deltas added after the base GEMMs, or accumulated in them (model/lora_op.py: faster eager, slower in compiled blocks; benchmarks/PERF_NOTES.md)
    base_matmul: str = "bf16"  # bf16 | fp8: the frozen block linears' matmuls on FP8 tensor cores, row-wise scaled (model/fp8.py; opt-in)
    compile: bool = False  # regional torch.compile of each DiT block (CUDA; pays with ZeRO-2, see benchmarks/PERF_NOTES.md)
    compile_vae: bool = False  # torch.compile the VAE encoder (CUDA: ~1.6x faster condition encodes, ~100 s to compile)
    vae_conv_kernel: str = "cudnn"  # cudnn | triton: the VAE encoder's causal 3x3x3 convolutions on a Triton implicit-GEMM kernel (CUDA, bf16; model/vae_conv.py)
    vae_frames_per_call: int = 4  # frames per causal VAE encoder call (a multiple of 4; same latents up to rounding, fewer larger kernels, more memory)
    vae_videos_per_call: int = 0  # videos per VAE call (0 = the whole batch): 1 keeps a long call's memory to one video's (81x352x624 at 80 frames: ~28 GB)
    umc: UMCConfig = field(default_factory=UMCConfig)

    def validate(self):
        p = []
        p += choice(self.preset, ["tiny", "1.3b", "14b"], "preset")
        p += choice(self.attention, ["auto", "fa4", "fa3", "fa2", "cudnn", "flash", "efficient", "math"], "attention")
        p += choice(self.text_encoder_device, ["auto", "cpu", "device"], "text_encoder_device")
        p += choice(self.design, ["dlc", "channel_concat", "width_concat"], "design")
        p += choice(self.activation_checkpointing, list(CHECKPOINT_MODES), "activation_checkpointing")
        p += in_range(self.activation_checkpointing_blocks, -1, None, "activation_checkpointing_blocks")
        p += in_range(self.activation_offload_blocks, -1, None, "activation_offload_blocks")
        p += in_range(self.activation_offload_min_mib, 0.0, None, "activation_offload_min_mib")
        p += choice(self.activation_checkpointing_unit, [*CHECKPOINT_UNITS, "auto"], "activation_checkpointing_unit")
        p += choice(self.compute_dtype, ["bf16", "fp32"], "compute_dtype")
        p += choice(self.base_matmul, ["bf16", "fp8"], "base_matmul")
        p += choice(self.lora_kernel, list(LORA_KERNELS), "lora_kernel")
        p += choice(self.vae_conv_kernel, ["cudnn", "triton"], "vae_conv_kernel")
        p += in_range(self.num_links, 0, None, "num_links")
        p += in_range(self.vae_videos_per_call, 0, None, "vae_videos_per_call")
        if self.vae_frames_per_call < 4 or self.vae_frames_per_call % 4:
            p.append(("vae_frames_per_call", f"must be a positive multiple of 4, got {self.vae_frames_per_call}"))
        return p

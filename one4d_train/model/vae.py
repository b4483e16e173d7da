"""The frozen Wan2.1 VAE: videos in [-1, 1] <-> normalised latents (z=16, stride 4x8x8).

Wraps diffusers' `AutoencoderKLWan`. It is deliberately not an `nn.Module`, so it never becomes part of the
trained model, its optimizer or its ZeRO partitioning. Latents are normalised per channel with Wan's
`latents_mean` / `latents_std` from the VAE config: z_norm = (z - mean) / std (the Wan2.1 values are the
config defaults). Encoding is deterministic by default (the posterior mean, as Wan's own pipelines use for
condition latents); `sample=True` draws from the posterior instead.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from one4d_train.model.pretrained import load_complete, load_state_dict, tensor_shapes
from one4d_train.model.vae_conv import supported, triton, use_triton_convs

TEMPORAL_STRIDE = 4
Z_DIM = 16  # latent channels of the Wan2.1 VAE, the DiT's input and output
SPATIAL_STRIDE = 8


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T_lat, h, w) of a T x H x W video: the first frame alone, then groups of 4; 8x8 in space."""
    if (num_frames - 1) % TEMPORAL_STRIDE or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ValueError(f"video of {num_frames}x{height}x{width}: need T = 4k+1 and H, W multiples of 8")
    return 1 + (num_frames - 1) // TEMPORAL_STRIDE, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


_RESNET = {("residual", "0"): "norm1", ("residual", "2"): "conv1", ("residual", "3"): "norm2",
           ("residual", "6"): "conv2"}
_RESNET_BACK = {v: ".".join(k) for k, v in _RESNET.items()}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_SIDE = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_SIDE_BACK = {v: k for k, v in _SIDE.items()}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_BACK = {v: k for k, v in _MIDDLE.items()}


def _resnet_to_diffusers(rest: list[str]) -> str:
    if rest[0] == "shortcut":
        return ".".join(["conv_shortcut"] + rest[1:])
    if rest[0] == "residual":
        return ".".join([_RESNET[(rest[0], rest[1])]] + rest[2:])
    return ".".join(rest)  # Resample (resample.1 / time_conv) and attention keep their names


def _resnet_to_official(rest: list[str]) -> str:
    if rest[0] == "conv_shortcut":
        return ".".join(["shortcut"] + rest[1:])
    if rest[0] in _RESNET_BACK:
        return ".".join([_RESNET_BACK[rest[0]]] + rest[1:])
    return ".".join(rest)


def official_to_diffusers_key(key: str, num_res_blocks: int = 2) -> str:
    """An official Wan2.1 VAE key (`Wan2.1_VAE.pth`) -> diffusers' `AutoencoderKLWan` name (the layout of
    diffusers' scripts/convert_wan_to_diffusers.py; Wan2.1's VAE has no attention outside the middle)."""
    parts = key.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]]] + parts[1:])
    side, block, rest = parts[0], parts[1], parts[2:]
    if block == "conv1" or block == "head":
        name = block if block == "conv1" else f"head.{rest.pop(0)}"
        return ".".join([side, _SIDE[name]] + rest)
    if block == "middle":
        return f"{side}.mid_block.{_MIDDLE[rest[0]]}.{_resnet_to_diffusers(rest[1:])}"
    if block == "downsamples":
        return f"{side}.down_blocks.{rest[0]}.{_resnet_to_diffusers(rest[1:])}"
    if block == "upsamples":
        stage, k = divmod(int(rest[0]), num_res_blocks + 2)
        inner = f"resnets.{k}" if k <= num_res_blocks else "upsamplers.0"
        return f"{side}.up_blocks.{stage}.{inner}.{_resnet_to_diffusers(rest[1:])}"
    raise KeyError(f"not a Wan2.1 VAE key: {key}")


def diffusers_to_official_key(key: str, num_res_blocks: int = 2) -> str:
    """The inverse of `official_to_diffusers_key`."""
    parts = key.split(".")
    if parts[0] in _TOP_BACK:
        return ".".join([_TOP_BACK[parts[0]]] + parts[1:])
    side, block, rest = parts[0], parts[1], parts[2:]
    if block in _SIDE_BACK:
        return ".".join([side, _SIDE_BACK[block]] + rest)
    if block == "mid_block":
        return f"{side}.middle.{_MIDDLE_BACK[f'{rest[0]}.{rest[1]}']}.{_resnet_to_official(rest[2:])}"
    if block == "down_blocks":
        return f"{side}.downsamples.{rest[0]}.{_resnet_to_official(rest[1:])}"
    if block == "up_blocks":
        k = int(rest[2]) if rest[1] == "resnets" else num_res_blocks + 1
        index = int(rest[0]) * (num_res_blocks + 2) + k
        return f"{side}.upsamples.{index}.{_resnet_to_official(rest[3:])}"
    raise KeyError(f"not an AutoencoderKLWan key: {key}")


def convert_official_state_dict(state: dict[str, torch.Tensor], model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    """Rename an official state dict onto `model`; every key on both sides must be matched."""
    nrb = model.config.num_res_blocks
    converted, unmatched = {}, []
    for key, value in state.items():
        try:
            converted[official_to_diffusers_key(key, nrb)] = value
        except (KeyError, IndexError, ValueError):
            unmatched.append(key)
    expected = model.state_dict()
    unexpected = sorted(unmatched + [k for k in converted if k not in expected])
    missing = sorted(k for k in expected if k not in converted)
    wrong = sorted(k for k in converted if k in expected and converted[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        raise KeyError(f"official Wan VAE checkpoint does not match AutoencoderKLWan(base_dim="
                       f"{model.config.base_dim}): missing {missing}, unexpected {unexpected}, wrong shape {wrong}")
    return converted


def load_official_vae(path: str) -> AutoencoderKLWan:
    """`Wan2.1_VAE.pth` (a plain state dict; loaded with weights_only=True), or the same weights as a .safetensors
    file (official names, as repackaged for other tools, or diffusers names). The width (96 for the released
    file) is read from the first convolution, so tiny files in the same layout load too."""
    state = load_state_dict(path)
    if "encoder.conv_in.weight" in state:  # diffusers names in one file
        model = AutoencoderKLWan(base_dim=state["encoder.conv_in.weight"].shape[0])
        expected = model.state_dict()
        missing = sorted(k for k in expected if k not in state)
        unexpected = sorted(k for k in state if k not in expected)
        wrong = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise KeyError(f"{path}: does not match AutoencoderKLWan(base_dim={model.config.base_dim}): missing "
                           f"{missing}, unexpected {unexpected}, wrong shape {wrong}")
        model.load_state_dict(state, strict=True)
        return model
    if "encoder.conv1.weight" not in state:
        raise KeyError(f"{path}: not an official Wan2.1 VAE state dict (no encoder.conv1.weight)")
    model = AutoencoderKLWan(base_dim=state["encoder.conv1.weight"].shape[0])
    model.load_state_dict(convert_official_state_dict(state, model), strict=True)
    return model


def vae_file_problem(path: str) -> str | None:
    """What makes the weights file `path` not the Wan2.1 VAE (official or diffusers names), from the safetensors
    header or a memory-mapped torch load, reading no weights: so that a wrong file (the DiT's 28 GB, say) is named
    before a run rather than read whole. None if it is one."""
    try:
        shapes = tensor_shapes(path)
    except ValueError as exc:
        return str(exc).removeprefix(f"{path}: ")
    quant = shapes.get("conv1.weight") or shapes.get("quant_conv.weight")
    if quant is None or not ("encoder.conv1.weight" in shapes or "encoder.conv_in.weight" in shapes):
        return "holds no Wan VAE weights (no encoder.conv1 or encoder.conv_in, conv1 or quant_conv)"
    if quant[0] != 2 * Z_DIM:
        return f"a VAE of {quant[0] // 2} latent channels, where the Wan2.1 VAE (and the DiT) has {Z_DIM}"
    return None


def load_diffusers_vae(path: str, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """A diffusers `AutoencoderKLWan` folder, refused naming it when it is not one or lacks weights (diffusers
    leaves those on the meta device, failing only at the first use with 'Cannot copy out of meta tensor')."""
    return load_complete(AutoencoderKLWan, path, "VAE", torch_dtype=dtype)


def _pad_channels(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Zero channels appended on dim 1 (a video's channels, a convolution weight's input channels)."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, extra))


class _PaddedInput:
    """A causal convolution run as if it had `_extra_in` more input channels, all zero: its input (and causal cache)
    and its weight are padded at call time, so the stored weight and the state dict stay the checkpoint's."""

    def forward(self, x, cache_x=None):
        cache_x = None if cache_x is None else _pad_channels(cache_x, self._extra_in)
        return super().forward(_pad_channels(x, self._extra_in), cache_x)

    def _conv_forward(self, x, weight, bias):
        padded = _pad_channels(weight, self._extra_in)
        if weight.is_contiguous(memory_format=torch.channels_last_3d):
            padded = padded.contiguous(memory_format=torch.channels_last_3d)
        return super()._conv_forward(x, padded, bias)


def _pad_input_channels(conv: torch.nn.Conv3d, channels: int) -> None:
    """Run `conv` with its input channels zero-padded up to `channels` (nothing to do if it has as many)."""
    extra = channels - conv.in_channels
    if extra > 0 and not isinstance(conv, _PaddedInput):  # a model wrapped twice is padded once
        cls = type(conv)
        conv.__class__ = type(f"PaddedInput{cls.__name__}", (_PaddedInput, cls), {})
        conv._extra_in = extra


def conv_kernel_problem(kernel: str, device, dtype: torch.dtype) -> str | None:
    """Why the encoder's convolutions cannot run on `kernel` (cudnn | triton) here, or None."""
    if kernel == "cudnn":
        return None
    if kernel != "triton":
        return "must be cudnn or triton"
    if torch.device(device).type != "cuda":
        return f"the Triton kernel runs on CUDA devices, not {device}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the Triton kernel computes in bf16 or fp16, not {dtype}"
    if triton is None:
        return "Triton is not installed"
    return None


def tiny_wan_vae(seed: int = 0, base_dim: int = 8) -> AutoencoderKLWan:
    """The real Wan VAE architecture (same blocks, strides, z=16, Wan2.1 latent statistics) with a small
    width and random weights, for tests and the CPU demo."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=base_dim)


class WanVAE:
    """Frozen Wan VAE. `dtype` is the compute dtype (bf16 on GPU); latents come back in float32.

    chunk_size: encode/decode at most this many videos per VAE call (0 = the whole batch at once); the
    peak activation memory grows with the chunk. tiling: diffusers' spatial tiling for frames larger than
    256 px (overlapping tiles blended, so results differ slightly from untiled encoding). compile:
    torch.compile the encoder in place (fuses the norms, activations and causal padding between the convs;
    H100, 81x352x624: 0.65 -> 0.40 s per video, after ~100 s of compilation on first use).
    frames_per_call: frames the causal encoder takes per call after the first frame (Wan's own loop: 4). Any
    multiple of 4 gives the same latents up to rounding (the causal convolutions carry their last frames across
    calls, and the temporal downsampling windows stay aligned; other kernel shapes round differently in bf16);
    longer calls mean fewer, larger kernels and more activation memory (81x352x624, bf16: ~3 GB at 4, ~10 GB at 16).
    On CUDA the convolution weights are stored channels-last (cuDNN's NDHWC kernels). pad_channels (default:
    on CUDA): the first convolution runs with its 3 RGB input channels zero-padded to 8, input and weight alike at
    call time (the same products; weights and state dict unchanged): with 3 channels cuDNN falls back to a kernel
    without tensor cores. conv_kernel: "cudnn", or "triton" (CUDA, bf16/fp16): the encoder's causal 3x3x3
    convolutions that `vae_conv.supported` takes (96 -> 96 channels at full resolution, 192, 384, and the first,
    whose 3 input channels the kernel pads to 32 instead) run on the Triton implicit-GEMM kernel of
    model/vae_conv.py, which reads the causal cache and the zero border in place.
    """

    def __init__(self, model: AutoencoderKLWan, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 chunk_size: int = 0, tiling: bool = False, compile: bool = False,
                 frames_per_call: int = TEMPORAL_STRIDE, pad_channels: bool | None = None, conv_kernel: str = "cudnn"):
        if frames_per_call < TEMPORAL_STRIDE or frames_per_call % TEMPORAL_STRIDE:
            raise ValueError(f"frames_per_call={frames_per_call}: need a positive multiple of {TEMPORAL_STRIDE}")
        problem = conv_kernel_problem(conv_kernel, device, dtype)
        if problem:
            raise ValueError(f"conv_kernel={conv_kernel}: {problem}")
        model = model.to(device)
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype)
        self.model = model.eval().requires_grad_(False)
        if (self.model.device.type == "cuda" if pad_channels is None else pad_channels) and conv_kernel == "cudnn":
            _pad_input_channels(model.encoder.conv_in, 8)  # (the Triton kernel pads it to 32 channels itself)
        if self.model.device.type == "cuda":  # cuDNN's channels-last conv3d kernels: H100 encode 0.73 -> 0.56-0.65 s
            for m in self.model.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        if conv_kernel == "triton" and not use_triton_convs(self.model.encoder):
            raise ValueError("conv_kernel=triton: no convolution of this VAE's encoder suits the kernel "
                             f"({supported(self.model.encoder.down_blocks[0].resnets[0].conv1)})")
        if compile:
            self.model.encoder.compile()  # in place: module names (and state-dict keys) unchanged
        if tiling:
            self.model.enable_tiling()
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.frames_per_call = frames_per_call
        self.conv_kernel = conv_kernel
        z = model.config.z_dim
        self.mean = torch.tensor(model.config.latents_mean, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        self.std = torch.tensor(model.config.latents_std, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "WanVAE":
        """A diffusers `AutoencoderKLWan` folder, or the official `Wan2.1_VAE.pth` file."""
        if os.path.isdir(path):
            return cls(load_diffusers_vae(path, kwargs.get("dtype", torch.float32)), **kwargs)
        if os.path.isfile(path):
            return cls(load_official_vae(path), **kwargs)
        raise FileNotFoundError(f"VAE weights not found: {path}")

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mean) / self.std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std + self.mean

    def _chunks(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        return x.split(self.chunk_size) if self.chunk_size > 0 else (x,)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (T-1)/4, H/8, W/8] (float32)."""
        latent_shape(*video.shape[2:])
        out = []
        for chunk in self._chunks(video):
            posterior = self._posterior(chunk.to(self.device, self.dtype))
            out.append(posterior.sample(generator) if sample else posterior.mean)
        return self.normalise(torch.cat(out))

    def _posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """diffusers' `AutoencoderKLWan._encode` loop, `frames_per_call` frames per causal call after the first
        (its own tiled and patchified paths unchanged)."""
        m = self.model
        if self.frames_per_call == TEMPORAL_STRIDE or m.use_tiling or m.config.patch_size is not None:
            return m.encode(x).latent_dist
        starts = [0, *range(1, x.shape[2], self.frames_per_call)]
        m.clear_cache()
        try:
            out = []
            for start in starts:
                m._enc_conv_idx = [0]
                frames = x[:, :, start:start + (1 if start == 0 else self.frames_per_call)]
                out.append(m.encoder(frames, feat_cache=m._enc_feat_map, feat_idx=m._enc_conv_idx))
            return DiagonalGaussianDistribution(m.quant_conv(torch.cat(out, 2)))
        finally:
            m.clear_cache()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T_lat, h, w] -> video [B, 3, 4 (T_lat - 1) + 1, 8h, 8w] in [-1, 1]."""
        z = self.denormalise(latents.to(self.device))
        return torch.cat([self.model.decode(c.to(self.dtype)).sample.float() for c in self._chunks(z)])

    def encode_many(self, videos: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor]:
        """Encode several [B, 3, T, H, W] batches of one shape (RGB clips, pointmaps, condition videos) in one
        batched call; returns their latents in the same order."""
        sizes = [v.shape[0] for v in videos]
        return list(self.encode(torch.cat(list(videos)), **kwargs).split(sizes))


def load_vae(path: str = "", seed: int = 0, **kwargs) -> WanVAE:
    """`ModelConfig.vae`: a diffusers folder or an official `.pth`; empty = the tiny random VAE. Its latents must
    have Wan2.1's 16 channels, the DiT's."""
    vae = WanVAE.from_pretrained(path, **kwargs) if path else WanVAE(tiny_wan_vae(seed), **kwargs)
    if vae.z_dim != Z_DIM:
        raise ValueError(f"VAE {path}: {vae.z_dim} latent channels, where the Wan2.1 VAE (and the DiT) has {Z_DIM}: "
                         "the VAE of another model (Wan2.2's has 48)?")
    return vae

"""Pretrained weights read without trusting them: every failure is a ValueError naming the file and what is wrong.

- Weight files: safetensors (headers read lazily), or torch files memory-mapped and loaded with weights_only=True,
  so nothing but tensors and plain containers is ever unpickled.
- Model folders (UMT5, CLIP, the diffusers VAE): loaded completely or refused. transformers and diffusers initialise
  every weight a checkpoint lacks at random (or leave it on the meta device) and only log a load report; a frozen
  encoder with random weights trains the adapters against noise without any error. Weights the model does not use
  (the decoder of a full UMT5 checkpoint, the text tower of a full CLIP one) are fine and left out.
"""
from __future__ import annotations

import pickle

import torch

DAMAGED = "truncated or damaged, e.g. an interrupted download or copy?"


def first_line(exc: BaseException) -> str:
    """An exception's first message line, or its type where it has none."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def open_safetensors(path: str, device: str = "cpu"):
    """`safetensors.safe_open(path)` (tensors read one at a time, on demand)."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(path, framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({DAMAGED}): {first_line(exc)}") from None


def load_torch_file(path: str):
    """`torch.load(path)` memory-mapped with weights_only=True: what the file holds, only tensors unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: holds objects other than tensors (a pickled module or class?), which are not "
                         "unpickled: torch files are read with weights_only=True; save its state dict, or better, a "
                         ".safetensors file") from None
    except (RuntimeError, OSError, EOFError) as exc:  # not a torch zip archive, truncated, a folder
        raise ValueError(f"{path}: not a readable torch file of tensors (truncated, or another format? safetensors "
                         f"files must end in .safetensors): {first_line(exc)}") from None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A whole weights file (.safetensors, else a torch file) as {name: tensor}; a torch file's {"state_dict": ...}
    wrapper is taken off."""
    if path.endswith(".safetensors"):
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    state = load_torch_file(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no flat state dict {{name: tensor}}")
    return state


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a weights file, from the safetensors header or a memory-mapped torch load: no weights read."""
    if path.endswith(".safetensors"):
        with open_safetensors(path) as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}


def load_complete(model_cls, path: str, what: str, **kwargs):
    """`model_cls.from_pretrained(path, local_files_only=True, **kwargs)` of a transformers or diffusers class,
    refused (ValueError naming `path` and the keys) when any weight of the model is not in the folder's files."""
    from safetensors import SafetensorError

    library = model_cls.__module__.split(".")[0]
    try:
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: a truncated file
        raise ValueError(f"{what} {path}: cannot be loaded as a {library} {model_cls.__name__} folder: "
                         f"{first_line(exc)}") from None
    missing = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"{what} {path}: {len(missing)} weight(s) of {model_cls.__name__} not in its files: {shown} "
                         f"(they would be left at random initialisation); is it a {model_cls.__name__} folder of the "
                         "right model, completely downloaded?")
    return model

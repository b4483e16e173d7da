"""The frozen towers' transformers folders (UMT5 text encoder, CLIP vision): loaded completely or refused.

transformers initialises every weight a checkpoint lacks at random and only logs a load report; a frozen
encoder with random weights trains the adapters against noise without any error. Weights the model does not
use (the decoder of a full UMT5 checkpoint, the text tower of a full CLIP one) are fine and left out.
"""
from __future__ import annotations


def load_complete(model_cls, path: str, what: str, **kwargs):
    """`model_cls.from_pretrained(path, local_files_only=True, **kwargs)`, refused (ValueError naming `path` and
    the keys) when any weight of the model is not in the folder's files."""
    from safetensors import SafetensorError

    try:
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # SafetensorError: a truncated file
        raise ValueError(f"{what} {path}: cannot be loaded as a transformers {model_cls.__name__} folder: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    missing = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"{what} {path}: {len(missing)} weight(s) of {model_cls.__name__} not in its files (they "
                         f"would be left at random initialisation): {shown}; is it a {model_cls.__name__} folder "
                         "of the right model, completely downloaded?")
    return model

"""`one4d export checkpoint=DIR out=DIR [from_zero=true]`: the branch adapters and control links of a checkpoint.

Every checkpoint already holds `adapters/` (written from the gathered trainable parameters); this checks it
(every file and key present, shapes consistent) and copies it to `out`. With `from_zero=true` (or when a
checkpoint has no adapters/) the adapters are rebuilt on the CPU from the DeepSpeed ZeRO partitions instead,
using the run's config.yaml: no GPU and no process group needed.

Output: lora_rgb.safetensors / lora_xyz.safetensors (diffusers WanTransformer3DModel LoRA keys),
control_links.safetensors (links + the XYZ patch embedding), adapter_config.json.
"""
from __future__ import annotations

import os
import shutil
import sys

from omegaconf import OmegaConf


def _args(argv: list[str]) -> dict[str, str]:
    out = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in ("checkpoint", "out", "from_zero"):
            raise SystemExit(f"one4d export: unexpected argument {a!r}\n\n{__doc__.strip()}")
        out[key] = value
    if "checkpoint" not in out or "out" not in out:
        raise SystemExit(f"one4d export: checkpoint= and out= are required\n\n{__doc__.strip()}")
    return out


def rebuild_from_zero(ckpt: str, out: str) -> None:
    from deepspeed.utils import zero_to_fp32

    from one4d_train.config import load_config
    from one4d_train.train.checkpoint import weights_only_load
    from one4d_train.model.adapters import export_adapters

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"one4d export: {cfg_path} not found (the run's merged config is needed to rebuild)")
    cfg = load_config([f"config={cfg_path}"])
    with weights_only_load(zero_to_fp32.torch):
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="ds", exclude_frozen_parameters=True)
    export_adapters(state, cfg.model, out)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    args = _args(argv)
    ckpt, out = args["checkpoint"], args["out"]
    if not os.path.isdir(ckpt):
        print(f"one4d export: checkpoint {ckpt} is not a directory", file=sys.stderr)
        return 2
    from one4d_train.model.adapters import read_adapters

    src = os.path.join(ckpt, "adapters")
    if OmegaConf.create({"v": args.get("from_zero", "false")}).v in (True, "true", "1") or not os.path.isdir(src):
        rebuild_from_zero(ckpt, out)
    else:
        read_adapters(src)  # raises on a missing file or key
        shutil.copytree(src, out, dirs_exist_ok=True)
    config, state = read_adapters(out)
    total = sum(t.numel() for t in state.values())
    print(f"exported {len(state)} tensors ({total / 2**20:.2f}M parameters; design {config['design']}, "
          f"branches {', '.join(config['branches'])}, link blocks {config['link_blocks']}) to {out}")
    return 0

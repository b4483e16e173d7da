"""`one4d print-config [--get KEY] config=x.yaml [key=value ...]`: the merged, validated config as YAML, or with
--get one value as it is (a path with spaces, say, for a script; YAML output wraps long values)."""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from one4d_train.config import ConfigError, load_config, to_yaml


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nexample: one4d print-config config=configs/experiment/demo.yaml train.steps=20"
              "\n         one4d print-config --get run_dir config=configs/experiment/demo.yaml")
        return 0
    key, rest = None, []
    items = iter(argv)
    for item in items:  # --get KEY (or --get=KEY) anywhere among the settings
        if item == "--get" or item.startswith("--get="):
            given = item.partition("=")[2] if "=" in item else next(items, None)
            if key is not None or not given or given.startswith("-"):
                print("config error: --get takes one key, e.g. --get run_dir", file=sys.stderr)
                return 2
            key = given
        else:
            rest.append(item)
    argv = rest
    try:
        cfg = load_config(argv)
        if key is None:
            print(to_yaml(cfg), end="")
            return 0
        value = OmegaConf.select(OmegaConf.structured(cfg), key, default=KeyError)
        if value is KeyError:
            raise ConfigError(f"--get {key}: no such key")
        print(to_yaml(value), end="") if OmegaConf.is_config(value) else print(value)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0

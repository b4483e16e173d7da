"""`one4d print-config config=x.yaml [key=value ...]`: the merged, validated config as YAML."""
from __future__ import annotations

import sys

from one4d_train.config import ConfigError, load_config, to_yaml


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nexample: one4d print-config config=configs/experiment/demo.yaml train.steps=20")
        return 0
    try:
        print(to_yaml(load_config(argv)), end="")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0

"""`python -m train [--config-dir DIR] [hydra overrides...]`: run one stage or a pipeline of stages.

`python -m train --cfg job` prints the composed config and exits; `--help` lists the config groups (with the
options of every `--config-dir`). `--config-dir DIR` adds the user's own options (train/config/compose.py).
"""
from __future__ import annotations

import sys
from typing import Sequence

from omegaconf import OmegaConf

from train.config.compose import CONFIG_DIR, compose_config, split_config_dirs, stage_configs
from train.config.model import ConfigError


def _print_help(args: list[str]) -> None:
    try:
        dirs = [CONFIG_DIR, *split_config_dirs(args)[1]]
    except ConfigError as err:
        print(f"longvl: config error: {err}", file=sys.stderr)
        dirs = [CONFIG_DIR]
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    print("usage: python -m train [--config-dir DIR] [GROUP=OPTION ...] [KEY=VALUE ...] [--cfg job]\n\n"
          "config groups:")
    for group in groups:
        options = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
        print(f"  {group}: {', '.join(options)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        _print_help(args)
        return 0
    show_cfg = False
    if "--cfg" in args:
        i = args.index("--cfg")
        show_cfg = True
        del args[i:i + 2]
    try:
        if show_cfg:
            cfg = compose_config(args)
            stage_configs(args)  # validate every stage, so --cfg job also catches bad values
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        configs = stage_configs(args)
    except ConfigError as err:
        print(f"longvl: config error: {err}", file=sys.stderr)
        return 2
    from train.pipeline import run_pipeline  # heavy imports only once the config is known to be good

    return run_pipeline(configs)


if __name__ == "__main__":
    sys.exit(main())

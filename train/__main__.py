"""`python -m train [hydra overrides...]`: run one stage or a pipeline of stages.

`python -m train --cfg job` prints the composed config and exits; `--help` lists the config groups.
"""
from __future__ import annotations

import sys
from typing import Sequence

from omegaconf import OmegaConf

from train.config.compose import CONFIG_DIR, compose_config, stage_configs
from train.config.model import ConfigError


def _print_help() -> None:
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    print("usage: python -m train [GROUP=OPTION ...] [KEY=VALUE ...] [--cfg job]\n\nconfig groups:")
    for group in groups:
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        print(f"  {group}: {', '.join(options)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        _print_help()
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

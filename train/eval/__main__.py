"""`python -m train.eval vniah checkpoint=PATH [lengths=[60,300]] [depths=[0,0.5,1]] [budget=N] ...`

Evaluations take Hydra-style KEY=VALUE overrides of their config (configs/eval/<name>.yaml, schema in
train/eval/config.py). Config errors print one line and exit with status 2.
"""
from __future__ import annotations

import sys
from typing import Sequence

from train.config.model import ConfigError
from train.models.native_io import CheckpointError

EVALUATIONS = ("vniah",)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in EVALUATIONS:
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        from train.eval.config import load_vniah_config
        from train.eval.vniah import run_vniah

        run_vniah(load_vniah_config(args[1:]))
    except (ConfigError, CheckpointError) as err:
        print(f"longvl eval: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `ds-train` console script: `--help` and `--print-config` answer before the engine is imported.

`python -m ds_train.train` and `deepspeed --module ds_train.train` take the same arguments.
"""

from __future__ import annotations

import sys

from ds_train.config_cli import parse_args, print_config


def main(argv: list[str] | None = None) -> int:
    files, overrides, print_only = parse_args(argv)  # --help ends here
    if print_only:
        return print_config(files, overrides)
    # Imported only for a run: slow (DeepSpeed and the engine, several seconds), and on a machine without
    # a GPU DeepSpeed logs its accelerator choice to stdout on import, which --print-config must not carry.
    from ds_train import train

    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())

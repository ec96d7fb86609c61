"""``python -m margin_ext.train`` and the ``margin-ext-train`` console script.

Single process: ``python -m margin_ext.train --output runs/demo``.
Several: ``torchrun --nproc-per-node 2 -m margin_ext.train --output runs/demo``.
From a config file or preset: ``python -m margin_ext.train --config ms1mv2_r50 --data /data/faces_emore``.
"""

from __future__ import annotations

import sys

from .checkpointing import CheckpointError, CheckpointWarning
from .cli import report_error, warning_lines
from .data.errors import DataError, DataWarning
from .distributed_launch import setup_distributed, teardown_distributed
from .extras import MissingExtra
from .options import OptionError, parse_args
from .trainer import TrainingDiverged, train

# Mistakes in what the user asked for, optional packages it needs that are missing, and a run
# that diverged (its checkpoints kept): reported as one line, exit status 2 (under torchrun
# too: .cli), no traceback.
USER_ERRORS = (OptionError, DataError, CheckpointError, MissingExtra, TrainingDiverged)


def main(argv=None) -> int:
    try:
        with warning_lines(CheckpointWarning, DataWarning):
            options = parse_args(argv)
            ctx = setup_distributed(options.device)
            train(options, ctx)
            # every rank leaves together: a rank that tears gloo down while rank 0 still writes
            # its logs can abort ("terminate called without an active exception")
            ctx.barrier()
    except USER_ERRORS as error:
        return report_error("margin-ext-train", str(error))
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

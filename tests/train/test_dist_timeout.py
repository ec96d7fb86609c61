"""A process alive but stuck no longer holds the others: --dist-timeout ends every rank with one line
naming the step (gloo on the CPU, two processes)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from margin_ext.train.watchdog import EXIT_STATUS

REPO = Path(__file__).resolve().parents[2]
TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--embedding-size", "16", "--batch-size", "8",
        "--val", "none", "--no-plot", "--no-tensorboard", "--steps", "6", "--log-every", "1"]

# rank 1 hangs inside step 3 (alive: sleeping, its sockets open); everything else is the real trainer
RANK = """
import sys, time
from margin_ext.train import trainer
from margin_ext.train.__main__ import main
real_step = trainer.Trainer._train_step
def train_step(self, *args, **kwargs):
    if self.ctx.rank == 1 and self.step == 2:
        time.sleep(3600)
    return real_step(self, *args, **kwargs)
trainer.Trainer._train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stuck_rank_ends_every_rank_with_one_line_naming_the_step(tmp_path):
    port, timeout_s = _free_port(), 20  # generous: a loaded CI machine must not trip it on a normal step
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    arguments = TINY + ["--dist-timeout", str(timeout_s), "--output", str(tmp_path / "run")]
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, *arguments], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=400) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    elapsed = time.monotonic() - started
    for number, (rank, (out, err)) in enumerate(zip(ranks, outputs)):
        assert rank.returncode == EXIT_STATUS, (number, rank.returncode, err[-3000:])
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert errors == [f"margin-ext-train: error: rank {number}: step 3 did not finish within --dist-timeout "
                          f"{timeout_s} s (a process is stuck or gone); stopping"], err[-3000:]
        assert "Traceback" not in err
    assert "step      2/6" in outputs[0][0]  # the steps before the stuck one ran
    assert elapsed < 300

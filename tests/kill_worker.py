"""Run by tests/test_data_streaming.py in a subprocess that kills itself with SIGKILL mid-job,
so the test can check that the job resumes as if nothing happened.

    kill_worker.py train RUN_DIR SPEC KILL_AT_STEP   # tiny preset, 12 steps of 8, a checkpoint every 3
    kill_worker.py pack SOURCE OUT KILL_AFTER_BLOCK  # blocks of 4 rows, 1 worker
"""

import os
import signal
import sys


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


mode, a, b, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "train":
    sys.path.insert(0, os.path.dirname(__file__))
    from test_data_streaming import streaming_run

    from vdvae_latents.train.loop import train

    train(a, streaming_run(b), quiet=True, on_step=lambda step, _: die() if step == n else None)
else:
    from vdvae_latents.data import pack_images

    pack_images(a, b, workers=1, block_rows=4, on_block=lambda block: die() if block == n else None)
raise SystemExit("the job ended before it was killed")

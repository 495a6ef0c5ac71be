"""Every two-rank check of the suite in one torchrun launch (2 gloo ranks on CPU), started once per
session by the ``torchrun_session`` fixture in tests/conftest.py: a launch costs a launcher and two
ranks that each import torch, so one launch instead of four saves most of these tests' time.

    torchrun --nproc_per_node 2 tests/torchrun_worker.py OUT DATA_NPY ENCODE_RUN ENCODE_DATA ENCODE_OUT

The ranks join one process group and run, in order:

1. data: tests/data_ddp_worker.py -> OUT/data/rank{r}.json   (tests/test_data_streaming.py)
2. KL:   tests/kl_ddp_worker.py   -> OUT/kl/rank{r}.npz      (tests/test_kl_analysis.py)
3. DDP:  tests/ddp_worker.py      -> OUT/train/              (tests/test_training.py)
4. scores: ``score_to_store`` of ENCODE_DATA's test split -> OUT/scores.zarr (tests/test_scores.py)
5. the real command line, as ``python -m vdvae_latents encode ENCODE_RUN --data ENCODE_DATA ... --out ENCODE_OUT``
   (tests/test_encode.py); last, because a successful command leaves the process group.

Each part writes OUT/<part>.ok on rank 0 when both ranks finished it. A part that raises prints
its traceback and ends the rank at once (exit 1), so torchrun stops the other rank instead of
leaving it waiting in a collective.
"""

import os
import runpy
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def part(name: str, out: Path, fn, *args) -> None:
    try:
        fn(*args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - any failure ends this rank, loudly
        print(f"torchrun_worker: part '{name}' failed on rank {dist.get_rank()}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if dist.get_rank() == 0:
        (out / f"{name}.ok").write_text("ok\n")


def score_store(run: str, data: str, out: Path) -> None:
    from vdvae_latents.stores.scores import score_to_store

    # The settings tests/test_scores.py scores the same split with in one process.
    score_to_store(run, data, out, split="test", ks="1,2", iw=2, chunk_rows=16, batch_size=8, device="cpu", workers=0)


def main() -> None:
    out, data_npy, encode_run, encode_data, encode_out = Path(sys.argv[1]), *sys.argv[2:6]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    import data_ddp_worker
    import ddp_worker
    import kl_ddp_worker

    part("data", out, data_ddp_worker.run, data_npy, out / "data")
    part("kl", out, kl_ddp_worker.run, out / "kl")
    part("train", out, ddp_worker.run, out / "train")
    part("scores", out, score_store, encode_run, encode_data, out / "scores.zarr")

    sys.argv = ["vdvae_latents", "encode", encode_run, "--data", encode_data, "--split", "test", "--keep", "25%",
                "--out", encode_out, "--chunk-rows", "32", "--device", "cpu", "--quiet"]
    runpy.run_module("vdvae_latents", run_name="__main__", alter_sys=True)  # exits with the command's status


if __name__ == "__main__":
    main()

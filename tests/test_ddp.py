"""Two gloo processes on the CPU run the real prune pipeline under torch.distributed."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, result_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pyengine.methods import Run, RunConfig

    cfg = RunConfig(model="resnet18", dataset="digits", image_size=8, epochs=1, rounds=1, batch_size=64,
                    method="egp", out=out, no_progress=True, entropy_batches=2, device="cpu")
    run = Run(cfg, log=lambda *a: None)
    report = run.run()
    params = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    counts = {k: v.tolist() for k, v in sorted(run.masks.masks.items())[:1]}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"fingerprint": run.masks.fingerprint(), "param_sum": float(params.double().sum()),
                   "acc": report["final_acc"], "sparsity": report["final_sparsity"], "n": len(counts)}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_prune_keeps_masks_and_weights_identical(tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["fingerprint"] == r1["fingerprint"]
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=0, abs=0)
    assert r0["acc"] == r1["acc"] and r0["sparsity"] == r1["sparsity"] > 0
    assert (tmp_path / "run" / "report.json").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["world_size"] == 2


def _first_worker(rank, world, port, log_path):
    import time

    from pyengine.train.dist import main_rank_first

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with main_rank_first():
            with open(log_path, "a") as f:
                f.write(f"start {rank}\n")
            if rank == 0:
                time.sleep(1.0)  # a download: rank 1 must not start before it ends
            with open(log_path, "a") as f:
                f.write(f"end {rank}\n")
    finally:
        dist.destroy_process_group()


def test_main_rank_first_lets_rank_0_finish_before_the_others_start(tmp_path):
    """What guards a --download under torchrun: every rank writing the same dataset files at once
    corrupts them, so rank 0 fetches and the others read once it is done."""
    log = tmp_path / "order.txt"
    mp.spawn(_first_worker, args=(2, _free_port(), str(log)), nprocs=2, join=True)
    assert log.read_text().split("\n")[:4] == ["start 0", "end 0", "start 1", "end 1"]

"""Task-parallel meta-training over torch.distributed (gloo processes on the CPU)."""
import json

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from imaml_fast import IMAML, IMAMLConfig
from imaml_fast import distributed as D
from imaml_fast.data import SinusoidSampler
from imaml_fast.models import sinusoid_mlp

CFG = IMAMLConfig(inner_steps=3, inner_lr=0.02, lam=2.0, cg_steps=4, cg_damping=10.0,
                  task_batching="vmap")
T, STEPS = 7, 3  # 7 tasks over 2 ranks: uneven shards (4 + 3)


def test_shards_cover_the_batch_once():
    for T_, world in ((7, 2), (8, 3), (5, 5), (1, 1)):
        parts = [D.shard(T_, r, world) for r in range(world)]
        covered = [i for s in parts for i in range(T_)[s]]
        assert covered == list(range(T_))
        sizes = [s.stop - s.start for s in parts]
        assert max(sizes) - min(sizes) <= 1


def _learner(device="cpu"):
    torch.manual_seed(0)
    model = sinusoid_mlp().double().to(device)
    return model, IMAML(model, F.mse_loss, CFG, torch.optim.Adam(model.parameters(), lr=1e-2),
                        distributed=D.enabled())


def _run(rank, world, path, device="cpu"):
    sampler = SinusoidSampler(5, 5, T, dtype=torch.float64, seed=3)
    if device != "cpu":
        device = f"cuda:{rank % torch.cuda.device_count()}"
    model, learner = _learner(device)
    mine = D.shard(T, rank, world)
    for _ in range(STEPS):
        xs, ys, xq, yq = (t[mine].to(device) for t in sampler.sample())
        learner.meta_step(xs, ys, xq, yq)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)


def _worker(rank, world, rendezvous, path, device="cpu"):
    D.init_local(rank, world, rendezvous, device)
    try:
        _run(rank, world, path, device)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    D.end_worker()


def test_two_gloo_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run(0, 1, one)
    with D.local_rendezvous() as rendezvous:
        mp.start_processes(_worker, args=(2, rendezvous, two), nprocs=2, join=True,
                           start_method="spawn")
    a, b = torch.load(one), torch.load(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(a[k], sinusoid_mlp().double().state_dict()[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA GPUs")
def test_two_nccl_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run(0, 1, one, "cuda")
    with D.local_rendezvous() as rendezvous:
        mp.start_processes(_worker, args=(2, rendezvous, two, "cuda"), nprocs=2, join=True,
                           start_method="spawn")
    a, b = torch.load(one), torch.load(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12)


def test_distributed_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        IMAML(sinusoid_mlp(), F.mse_loss, CFG, distributed=True)


def test_reduce_weights_by_tasks_and_counts_bad_tasks():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0]])
    bad = torch.tensor([False, False, True])
    mean, n_bad = D.reduce_meta_gradient(g, bad)
    assert n_bad == 1 and torch.equal(mean, torch.tensor([4.0, 6.0]) / 3)


def test_cli_nproc_2_matches_one_process_and_resumes_with_another_count(tmp_path):
    from imaml_fast.checkpoint import load_checkpoint
    from imaml_fast.train import RunSettings, train_multiprocess

    def settings(out, nproc, steps):
        return RunSettings.from_preset("sinusoid", out=str(tmp_path / out), steps=steps, tasks=4,
                                       inner_steps=2, progress=False, task_batching="vmap",
                                       nproc=nproc, checkpoint_every=2, eval_every=2,
                                       eval_tasks=6)

    train_multiprocess(settings("one", 1, 4))
    train_multiprocess(settings("two", 2, 4))
    train_multiprocess(settings("mixed", 2, 2))
    train_multiprocess(settings("mixed", 1, 4), resume=True)  # resumed with one process
    ref = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    for run in ("two", "mixed"):
        got = load_checkpoint(tmp_path / run / "checkpoint.pt")
        assert got["step"] == 4
        for k in ref:
            torch.testing.assert_close(got["model"][k], ref[k], rtol=1e-5, atol=1e-6)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank 0 alone writes the log
    # evaluations: each process adapts its share of the same meta-test tasks
    evals = {run: [json.loads(l) for l in (tmp_path / run / "evals.jsonl").read_text().splitlines()]
             for run in ("one", "two", "mixed")}
    assert [e["step"] for e in evals["two"]] == [2, 4] and [e["step"] for e in evals["mixed"]] == [2, 4]
    for run in ("two", "mixed"):
        for a, b in zip(evals[run], evals["one"]):
            assert a["tasks"] == 6 and a["mean"] == pytest.approx(b["mean"], rel=1e-5)


def test_a_time_limit_stops_both_processes_at_the_same_step(tmp_path):
    from imaml_fast.checkpoint import load_checkpoint
    from imaml_fast.train import RunSettings, train_multiprocess

    s = RunSettings.from_preset("sinusoid", out=str(tmp_path / "run"), steps=4, tasks=4,
                                inner_steps=2, progress=False, task_batching="vmap", nproc=2)
    summary = train_multiprocess(s, max_seconds=1e-9)  # past the limit after the first step
    assert summary["stopped"] == "time limit" and summary["steps"] == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1

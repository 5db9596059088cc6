"""Data-parallel training on CPU: real processes (torchrun, gloo, OMP_NUM_THREADS=1), and fastai's own failure.

The two-process runs start tests/_ddp_worker.py through torchrun; each test asserts on what the processes
wrote. The in-process tests use a one-process gloo group (the collectives run, nothing is spawned).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fastai.distributed import DistributedDL as FastaiDistributedDL
from fastai.distributed import DistributedTrainer as FastaiDistributedTrainer
from torch import nn

from fastlesson import distributed as fd

from _recipe_helpers import write_image_folder
from _tiny import TinyCNN, make_tiny_learner, synthetic_dsets

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"
N_TRAIN, N_VALID = 64, 32  # as in _ddp_worker.py
RUN_TIMEOUT_S = 480  # a hung run fails the test instead of hanging the suite (a run takes ~20-60 s)
RECIPE_TIMEOUT_S = 200  # s a collective waits in the recipe runs (rank 0 writes plots and checkpoints alone)


def _env(timeout_s: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FASTLESSON_DIST_TIMEOUT_S": str(timeout_s),
           "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "MPLBACKEND": "Agg"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launcher's
        env.pop(k, None)
    return env


def torchrun(args: list, timeout_s: int = 60, nproc: int = 2, cwd=REPO) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS` with a hard wall-clock limit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(timeout_s), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def failure(proc: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed run printed (its end) and where each process was when torchrun stopped it."""
    stacks = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(out).glob("stack-rank*.txt"))
                     if p.stat().st_size)
    return proc.stdout[-2000:] + proc.stderr[-4000:] + stacks


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One two-process training run of the worker; its per-rank reports and final weights."""
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun([WORKER, out, "train"])
    assert proc.returncode == 0, failure(proc, out)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return reports, states


def test_weights_identical_on_both_ranks_after_training(ddp_run):
    reports, (s0, s1) = ddp_run
    assert [r["world_size"] for r in reports] == [2, 2]
    assert s0.keys() == s1.keys() and not any(k.startswith("module.") for k in s0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # parameters and BatchNorm buffers, bitwise
    untrained = TinyCNN().state_dict()
    assert not torch.equal(s0["1.2.weight"], untrained["1.2.weight"])  # and it did train


def test_each_rank_saw_a_disjoint_half_of_each_epoch(ddp_run):
    (r0, r1), _ = ddp_run
    assert r0["seen_match_err"] < 1e-3 and r1["seen_match_err"] < 1e-3  # fingerprints matched items exactly
    assert len(r0["seen"]) == len(r1["seen"]) == 2  # two SGDR epochs
    for e0, e1 in zip(r0["seen"], r1["seen"]):
        assert len(e0) == len(e1) == N_TRAIN // 2
        assert not set(e0) & set(e1) and set(e0) | set(e1) == set(range(N_TRAIN))
    assert r0["seen"][0] != r0["seen"][1]  # reshuffled between epochs (rank 0's order, broadcast)


def test_find_lr_gives_the_same_lr_on_both_ranks(ddp_run):
    (r0, r1), _ = ddp_run
    assert r0["lr"] == r1["lr"] and r0["lr_stop"] == r1["lr_stop"]
    assert r0["lr_losses"] == r1["lr_losses"]  # the mean loss over both processes, every batch
    assert len(r0["lr_losses"]) == 30  # num_it batches although each epoch is half as long per process


def test_precompute_body_pass_is_split_across_ranks_and_gathered(ddp_run):
    (r0, r1), _ = ddp_run
    # each process ran the body over half of the training and half of the validation items ...
    assert r0["n_body_items"] == r1["n_body_items"] == (N_TRAIN + N_VALID) // 2
    # ... and both hold all the activations, in dataset order, equal to a one-process body pass
    assert r0["n_features"] == r1["n_features"] == N_TRAIN
    assert r0["features_close"] and r1["features_close"]
    assert r0["head_accuracy"] == r1["head_accuracy"] is not None


def test_callbacks_and_get_preds_work_inside_distrib_ctx(ddp_run):
    (r0, r1), _ = ddp_run
    _, valid = synthetic_dsets(N_TRAIN, N_VALID)
    for r in (r0, r1):  # get_preds gathers the shards: every validation item once, in order
        assert r["n_preds"] == N_VALID and r["targets"] == valid.tensors[1].tolist()
    assert r0["preds_sum"] == r1["preds_sum"]
    assert r0["es_best_epoch"] == r1["es_best_epoch"] is not None  # EarlyStopping restored a plain state_dict


def test_only_rank_0_writes_files(ddp_run):
    (r0, r1), _ = ddp_run
    assert r1["events"] == []
    assert any(e.startswith("os.rename") and e.endswith(".safetensors") for e in r0["events"])  # the cache


@pytest.mark.parametrize("how, expect", [
    ("kill", "Signal 9 (SIGKILL)"),  # torchrun names the dead rank and stops the other one
    ("stall", "distributed training failed on rank 0 of 2"),  # ours, after the collective timeout
])
def test_a_failed_rank_makes_the_run_fail_clearly_not_hang(tmp_path, how, expect):
    proc = torchrun([WORKER, tmp_path, how], timeout_s=10)  # RUN_TIMEOUT_S bounds the whole run
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert expect in out, out[-4000:]
    assert not (tmp_path / "rank0.json").exists()  # nothing pretends the run completed


def test_recipe_smoke_under_two_processes_writes_one_run_folder_from_rank_0(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = torchrun([WORKER, tmp_path, "recipe", data, run], timeout_s=RECIPE_TIMEOUT_S)
    assert proc.returncode == 0, failure(proc, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["exit"] == r1["exit"] == 0
    assert r1["events"] == [] and r0["events"]  # rank 1 created, renamed or removed nothing in the run folder
    names = sorted(p.name for p in run.iterdir())
    for f in ("config.json", "metrics.json", "history.csv", "report.md", "model.safetensors", "model.json",
              "lr_find_head.png", "lr_find_full.png", "confusion.png"):
        assert f in names
    assert not [n for n in names if n.startswith(".") or n == "checkpoint"]  # no temp files, checkpoints removed
    metrics = json.loads((run / "metrics.json").read_text())
    d = metrics["distributed"]
    assert (d["world_size"], d["backend"], d["bs_per_process"], d["global_bs"]) == (2, "gloo", 8, 16)
    assert d["lr_rule"].startswith("not scaled") and d["batchnorm"].startswith("synchronized")
    assert all(metrics["lr_find"][k]["stop_reason"] != "failed" for k in ("head", "full"))  # both suggested
    assert proc.stdout.count("Step 8/8") == 1  # one log: rank 0's


def test_recipe_killed_in_step_8_resumes_under_two_processes(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    killed = torchrun([WORKER, tmp_path, "recipe-kill", data, run], timeout_s=RECIPE_TIMEOUT_S)
    assert killed.returncode != 0 and (tmp_path / "rank1-killed").exists(), failure(killed, tmp_path)
    assert (run / "checkpoint" / "state.json").is_file() and not (run / "metrics.json").exists()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["after"] == "full_sgdr cycle 1"
    resumed = torchrun([WORKER, tmp_path, "recipe-resume", data, run], timeout_s=RECIPE_TIMEOUT_S)
    assert resumed.returncode == 0, failure(resumed, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["events"] == [] and r0["events"]
    assert r0["accuracy"] == r1["accuracy"]
    assert r0["resumed"][0]["after"] == "full_sgdr cycle 1" and r0["distributed"]["world_size"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    step8 = next(s for s in metrics["steps"] if s["name"] == "full_sgdr")
    assert (step8["epochs"], step8["cycles"]) == (3, 2)  # the second cycle ran after the resume
    assert step8["averaged_cycles"] == 2  # cycle 1's end came back from the checkpoint and was averaged


# --------------------------------------------------------------------------------------------------------
# in-process: a one-process gloo group


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fastai_unpatched_fails_on_cpu(gloo_group):
    learn = make_tiny_learner()
    # 1. fastai's DistributedDL broadcasts the item order with .cuda(): "nccl only works with cuda tensors"
    with pytest.raises((RuntimeError, AssertionError), match="(?i)nvidia|cuda"):
        list(FastaiDistributedDL(learn.dls.train, rank=0, world_size=1))
    # 2. its DistributedTrainer converts to SyncBatchNorm by default, which refuses CPU tensors
    assert inspect.signature(FastaiDistributedTrainer.__init__).parameters["sync_bn"].default is True
    model = nn.SyncBatchNorm.convert_sync_batchnorm(TinyCNN())
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        model(torch.randn(4, 3, 16, 16))
    # fixed: the same loader broadcasting on the gloo backend's device, every item once
    ours = fd.DistributedDL(learn.dls.train, rank=0, world_size=1)
    assert sum(len(b[1]) for b in ours) == len(learn.dls.train_ds)
    assert fd.DistributedTrainer().sync_bn is True  # ours: synchronized BatchNorm on CPU too (gloo)


@pytest.mark.parametrize("n, drop_last, per_rank", [(40, False, 24), (40, True, 16), (48, False, 24)])
def test_items_are_dealt_out_in_global_batches(monkeypatch, n, drop_last, per_rank):
    """bs 8, 2 processes: rank r gets rows [8r, 8r+8) of every global batch of 16; equal full batches."""
    monkeypatch.setattr(fd.DistributedDL, "_broadcast", lambda self, t, rank: list(t))  # no process group
    from fastai.data.core import DataLoaders

    train, _ = synthetic_dsets(n, 4)
    dl = DataLoaders.from_dsets(train, train, bs=8, shuffle=False, drop_last=drop_last, device="cpu").train
    shards = [fd.DistributedDL(dl, rank=r, world_size=2).get_idxs() for r in (0, 1)]
    assert [len(s) for s in shards] == [per_rank, per_rank]
    assert shards[0][:8] == list(range(8)) and shards[1][:8] == list(range(8, 16))
    assert len(fd.DistributedDL(dl, rank=0, world_size=2)) == per_rank // 8
    assert set(shards[0] + shards[1]) == set(range(n if not drop_last else per_rank * 2))  # padding repeats the first items


def test_sync_bn_keeps_the_layers_and_is_undone():
    model = TinyCNN()
    bn = model[0][0][1]
    layers = fd._to_sync_bn(model)
    assert len(layers) == 2 and model[0][0][1] is bn and "forward" in bn.__dict__  # the same module, synced
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # fastai's BnFreeze still sees it
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert torch.allclose(model(x), fd._restore_bn(layers) or model(x))  # one process: plain BatchNorm
    assert "forward" not in bn.__dict__


def test_synchronized_batchnorm_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Each process holds part of the batch (8+8, then 5+11 rows, channels-last): outputs, input and
    parameter gradients and running statistics are those of plain BatchNorm on the whole batch."""
    proc = torchrun([WORKER, tmp_path, "syncbn"])
    assert proc.returncode == 0, failure(proc, tmp_path)
    for r in (0, 1):
        err = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert err.pop("n_layers") == 2 and err.pop("restored") is True
        assert set(err) == {"out", "grad_x", "grad_params", "running_stats", "eval_out"}
        assert max(err.values()) < 1e-4, err


def test_accelerate_cpu_launcher_starts_one_process_and_multi_gpu_flag_starts_n(tmp_path):
    """Accelerate issue 2741: `--cpu` takes the single-process launcher; `--multi_gpu` runs torchrun."""
    script = tmp_path / "who.py"  # each process leaves a file named after its RANK and WORLD_SIZE
    script.write_text("import os, sys, pathlib\n"
                      "e = os.environ.get\n"
                      "pathlib.Path(sys.argv[1], f\"rank{e('RANK')}-of-{e('WORLD_SIZE')}\").touch()\n")

    def launch(flag):
        seen = tmp_path / flag.strip("-")
        seen.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(seen)]
        proc = subprocess.run(cmd, env=_env(30), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sorted(p.name for p in seen.iterdir())

    assert launch("--cpu") == ["rankNone-of-None"]  # one process, not two
    assert launch("--multi_gpu") == ["rank0-of-2", "rank1-of-2"]


def test_one_process_distrib_ctx_is_a_no_op(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    learn = make_tiny_learner()
    n_cbs = len(learn.cbs)
    with fd.distrib_ctx(learn) as same:
        assert same is learn and len(learn.cbs) == n_cbs and not fd.in_distrib_ctx(learn)
        learn.fit(1)
    assert (fd.world_size(), fd.rank(), fd.is_main_process(), fd.is_distributed()) == (1, 0, True, False)
    assert fd.broadcast_object({"a": 1}) == {"a": 1} and fd.all_gather_object(3) == [3]
    t = torch.arange(5.0)
    assert torch.equal(fd.gather_shards(t, 3, 2), t[:3]) and fd.mean_across_ranks(t) is t
    assert fd.trainer_cbs(learn) == [] and fd.shard_dl(learn.dls.train) is learn.dls.train


def test_init_distributed_names_the_missing_launcher_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not set: start the script with `torchrun"):
        fd.init_distributed()
    monkeypatch.setenv("FASTLESSON_DIST_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="timeout_s=0.0"):
        fd._timeout_s(None)


# --------------------------------------------------------------------------------------------------------
# GPU (bench/gpu_check.sh runs these with `pytest -m gpu`)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda_only
def test_gpu_one_process_nccl_group_broadcasts_on_the_gpu(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert fd.comm_device().type == "cuda"
        learn = make_tiny_learner()
        learn.dls.to(torch.device("cuda"))
        dl = fd.DistributedDL(learn.dls.train, rank=0, world_size=1)
        batches = list(dl)
        assert sum(len(b[1]) for b in batches) == N_TRAIN and batches[0][0].is_cuda
        assert fd.DistributedTrainer().sync_bn is True  # synchronized BatchNorm (nccl)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_mixed_precision_channels_last_training_lowers_the_loss(precision):
    import fastai.callback.channelslast  # noqa: F401
    import fastai.callback.fp16  # noqa: F401

    learn = make_tiny_learner(n_train=128, bs=32)
    learn.dls.to(torch.device("cuda"))
    learn.model.cuda()
    learn.to_channelslast(use_amp=False)
    learn.to_fp16() if precision == "fp16" else learn.to_bf16()
    before = float(learn.validate()[0])
    learn.fit(3, 1e-2)
    assert float(learn.validate()[0]) < before

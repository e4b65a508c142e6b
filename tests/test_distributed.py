"""DistributedDataParallel on the CPU with gloo: the pairwise loss over the global batch.

A 2-process step must equal a 1-process step on the concatenated batch, and torchrun runs of
main.py must finish, write one run folder, and resume from rank 0's checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, metrics_without_seconds, run_script, subprocess_env

from config import parse_args
from distributed import close_distributed, from_rank0, gather_batch, rank0_first
from losses import Objective
from models import build_model
from training import build_trainer, make_scheduler, train_step

BATCH = 16
LOSSES = ("standalone", "cent")


def tensors(model: torch.nn.Module, objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = torch.nn.ModuleDict(dict(model=model, objective=objective)).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def plain_step(loss_name: str, x: torch.Tensor, y: torch.Tensor, wrap=None) -> dict:
    """One SGD step of lenet++ (no batch norm: the slices' statistics cannot differ) on the
    gathered batch: its loss and the tensors before and after."""
    torch.manual_seed(0)
    model, objective = build_model("lenet++", 1, 10, 2, 28), Objective(loss_name, 10, 2)
    if loss_name == "standalone":
        model.classifier.requires_grad_(False)
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    before = tensors(model, objective)
    net = wrap(model) if wrap else model  # kept: DDP's hooks reduce the gradients in backward
    features, logits = net(x)
    loss, _ = objective(*gather_batch(features, logits, y))
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "before": before, "after": tensors(model, objective)}


def paper_steps(loss_name: str, x: torch.Tensor, y: torch.Tensor, world: int) -> dict:
    """main.py's trainer (lenet++'s recipe: standardised input, weight decay, clipping) with the
    paper's center update: two guarded steps (the second sees momentum and moved centers)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (BATCH, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = SimpleNamespace(channels=1, classes=list(range(10)), image_size=28)
    data.train = SimpleNamespace(images=images)
    flags = f"--model lenet++ --loss {loss_name} --center-update paper --device cpu".split()
    trainer = build_trainer(parse_args(flags), data, torch.device("cpu"), world)
    before = tensors(trainer.model, trainer.objective)
    for _ in range(2):
        assert train_step(trainer, x, y)[-1]
    return {"before": before, "after": tensors(trainer.model, trainer.objective)}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank `rank` of `world`: on its slice, a plain DDP step and two of main.py's paper-update
    steps per loss; rank 0's schedule; the order of rank0_first's loads."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    ddp = torch.nn.parallel.DistributedDataParallel
    steps = {("plain", n): plain_step(n, x[rows], y[rows], wrap=ddp) for n in LOSSES}
    steps |= {("paper", n): paper_steps(n, x[rows], y[rows], world) for n in LOSSES}
    # The schedule (patience 0) on rank 0's accuracies, 0.5 then 0.5, cuts the rate; rank 1's own,
    # 0.5 then 0.9, would not.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = make_scheduler(optimizer, parse_args(["--patience", "0", "--device", "cpu"]))
    for accuracy in (0.5, 0.5 if rank == 0 else 0.9):
        scheduler.step(from_rank0(accuracy, torch.device("cpu")))

    def load(download: bool) -> int:  # rank 0 comes late: without the barrier rank 1 reads first
        time.sleep(0.5 if rank == 0 else 0)
        with open(f"{out}.order", "a") as f:
            f.write(f"rank {rank} download={download}\n")
        return rank

    assert rank0_first(load) == rank
    lr = optimizer.param_groups[0]["lr"]
    torch.save({"steps": steps, "lr": lr}, f"{out}.{rank}")
    close_distributed(finished=True)  # as main.py: no process group left to interpreter shutdown


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, torchruns) -> list[dict]:
    """What each of two gloo processes computed (worker), spawned once for the tests below while the
    torchrun runs start."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2, join=True)
    results = [torch.load(f"{tmp / 'result'}.{rank}", weights_only=True) for rank in range(2)]
    return [r | {"order": (tmp / "result.order").read_text().splitlines()} for r in results]


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("kind", ["plain", "paper"])
def test_two_process_steps_equal_one_process_on_the_whole_batch(
    two_processes: list[dict], kind: str, loss_name: str
) -> None:
    """A DDP step, and two of main.py's steps with the paper's center update (each rank updates its
    centers from the gathered global batch): both ranks end with the loss, weights and centers of
    one process that stepped on the whole batch, and the steps moved them."""
    x, y = batch()
    expected = plain_step(loss_name, x, y) if kind == "plain" else paper_steps(loss_name, x, y, 1)
    after = expected["after"]
    moved = [k for k, v in after.items() if not torch.equal(v, expected["before"][k])]
    assert len(moved) > 4 and "objective.criterion.centers" in moved
    for rank in range(2):
        result = two_processes[rank]["steps"][kind, loss_name]
        if kind == "plain":
            assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        torch.testing.assert_close(result["after"], after, rtol=1e-5, atol=1e-6)


def test_rank_0_decides_the_schedule_and_downloads_first(two_processes: list[dict]) -> None:
    """Every rank's ReduceLROnPlateau steps on rank 0's accuracy (ranks whose own accuracies differ
    would train at different rates), and rank 0 loads, downloading what is missing, first."""
    assert [two_processes[rank]["lr"] for rank in range(2)] == [0.01 * 0.2] * 2
    assert two_processes[0]["order"] == ["rank 0 download=True", "rank 1 download=False"]


def test_a_cuda_index_under_torchrun_is_refused(monkeypatch, capsys) -> None:
    """--device cuda:1 would put every process on GPU 1: one line, exit 2."""
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="h").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(SystemExit) as info:
        parse_args(["--device", "cuda:1"])
    assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --device cuda:1 under torchrun would put all 2 processes on one GPU; give --device "
        "cuda (each process takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES"
    )


# The 2-process gradient sums round differently in the last bit; lenet++'s first steps amplify that
# (at lr 0.01 about fivefold a step: 16 steps later the runs differed by 7 test images in ncm_acc).
TINY = "--device cpu --dataset digits --train-samples 128 --batch-size 32 --no-plots --loss cent"
TINY = [*TINY.split(), "--eval-every", "1", "--lr", "0.001"]
RESNET = TINY[:-2]  # the default model (ResNet, BatchNorm) at the default rate
TINY += ["--model", "lenet++"]


def torchrun(*args) -> subprocess.CompletedProcess:
    """main.py under torchrun, 2 CPU processes of one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["main.py", *map(str, args)]
    options = dict(capture_output=True, text=True, env=subprocess_env(), timeout=600)
    return subprocess.run(command, cwd=REPO, **options)


@pytest.fixture(scope="module")
def torchruns(tmp_path_factory) -> dict:
    """name -> (--out, the future of its processes): every main.py run of the tests below, started
    at once (mostly process start-up, which overlaps side by side); the cut run is resumed after."""
    tmp = tmp_path_factory.mktemp("torchrun")

    def cut_and_resume() -> list[subprocess.CompletedProcess]:
        first = torchrun(*RESNET, "--epochs", 1, "--out", tmp / "cut")
        (tmp / "cut" / "cent-digits-feat=2" / "summary.json").unlink()
        return [first, torchrun(*RESNET, "--epochs", 2, "--out", tmp / "cut")]

    chains = {
        "lenet": lambda: [torchrun(*TINY, "--epochs", 2, "--out", tmp / "lenet")],
        "one": lambda: [run_script("main.py", [*TINY, "--epochs", 2, "--out", tmp / "one"])],
        "straight": lambda: [torchrun(*RESNET, "--epochs", 2, "--out", tmp / "straight")],
        "cut": cut_and_resume,
        "batch": lambda: [torchrun(*TINY, "--batch-size", 33, "--out", tmp / "batch")],
    }
    with ThreadPoolExecutor(len(chains)) as pool:
        yield {name: (tmp / name, pool.submit(chain)) for name, chain in chains.items()}


def finished(torchruns: dict, name: str, code: int = 0) -> tuple[Path, list]:
    """(--out, its processes) of the run `name`, whose last process exited `code`."""
    out, future = torchruns[name]
    procs = future.result()
    codes = [p.returncode for p in procs]
    assert codes == [*[0] * (len(procs) - 1), code], procs[-1].stderr[-3000:]
    return out, procs


def test_torchrun_end_to_end_matches_single_process(torchruns: dict) -> None:
    (out, [proc]), (one, _) = finished(torchruns, "lenet"), finished(torchruns, "one")
    run_dir = out / "cent-digits-feat=2"
    assert list(out.iterdir()) == [run_dir]
    assert json.loads((run_dir / "args.json").read_text())["world_size"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["train_size"] == 128
    assert proc.stdout.count("epoch 1/2") == 1  # only rank 0 prints
    rows = zip(metrics_without_seconds(run_dir), metrics_without_seconds(one / run_dir.name))
    for ours, theirs in rows:
        for key in ("train_loss", "train_xent", "train_intra", "test_loss"):
            assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=2e-3, abs=2e-3), key
        for key in ("train_acc", "test_acc", "ncm_acc"):  # 3 of 360 test images may cross over
            assert float(ours[key]) == pytest.approx(float(theirs[key]), abs=3 / 360 + 1e-6), key


def test_torchrun_resnet_resumes_like_the_uninterrupted_run(torchruns: dict) -> None:
    """The default model (ResNet, BatchNorm) with softmax + centers under torchrun: a two-process
    run stopped after epoch 1 and resumed ends with the metrics of an uninterrupted one. On the CPU
    each process keeps its own BatchNorm statistics (SyncBatchNorm needs a GPU; DDP broadcasts rank
    0's buffers every forward, and the checkpoint holds rank 0's); test_models tests the
    SyncBatchNorm conversion."""
    (cut, [_, resumed]), (straight, _) = finished(torchruns, "cut"), finished(torchruns, "straight")
    cut, straight = (out / "cent-digits-feat=2" for out in (cut, straight))
    assert "resuming" in resumed.stdout
    assert json.loads((cut / "args.json").read_text())["model"] == "resnet"
    assert metrics_without_seconds(cut) == metrics_without_seconds(straight)


def test_batch_size_must_split_across_processes(torchruns: dict) -> None:
    """What README says a refused torchrun run shows: each worker's own line first, then torchrun's
    ChildFailedError with the workers' exit code 2, and torchrun's own exit code 1."""
    out, [proc] = finished(torchruns, "batch", code=1)
    err = proc.stderr
    line = "main.py: error: --batch-size 33 must be a multiple of the 2 processes (it is the global batch)"
    assert err.count(line) == 2  # one per worker
    assert err.rindex(line) < err.index("ChildFailedError") < err.index("Root Cause")
    assert re.search(r"exitcode\s*:\s*2", err)
    assert not out.exists()

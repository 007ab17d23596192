"""Scale-out: gradient accumulation (GradCache) and 2-process data parallelism give the single-process
full-batch loss and gradients, each process reading only its share of the batch from the image store; the
locked-tower feature cache gives the same training as recomputing."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clipmed.data.datasets import epoch_order
from clipmed.data.split import load_prepared
from clipmed.data.store import open_store
from clipmed.training.config import TrainConfig
from clipmed.training.distributed import World
from clipmed.objectives import get_objective
from clipmed.training.step import StepRunner
from clipmed.training.train import _image_batches, train, training_rows
from helpers import REPO, tiny_dual


def _gradients(objective: str, prepared_dir, *, accum_steps: int = 1, world: World = World(), seed: int = 0,
               local_loss: bool = False):
    """Loss and gradients of the first batch of 12 rows, the model in eval mode (no batch statistics, no dropout);
    this process reads its share of the batch's pixels from the image store, as training does."""
    config = TrainConfig(objective=objective, precision="fp32", accum_steps=accum_steps, batch_size=12,
                         local_loss=local_loss, loader_workers=0)
    rows = training_rows(load_prepared(prepared_dir), config)
    model = tiny_dual(seed=seed)
    model.eval()
    paths = [r.image_path for r in rows.records]
    store = open_store(paths, model.preprocess.size, model.preprocess.interpolation)
    pixels = next(_image_batches(store, store.lookup(paths)[0], config, world, steps_per_epoch=1, start=0, stop=1))
    assert len(pixels) == 12 // world.size  # its own share only
    objective = get_objective(objective)
    objective.prepare_model(model, config)
    runner = StepRunner(model, objective.loss(config, model), config, world)
    batch = objective.batch(rows, epoch_order(len(rows.records), config.seed, 0)[:12], config)
    loss = runner(dataclasses.replace(batch, pixels=pixels))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(reference, other):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:  # float32 sums in another order: equal up to rounding, relative to the gradient's size
        assert (grads_a[name] - grads_b[name]).norm() <= 1e-4 * grads_a[name].norm() + 1e-7, name


@pytest.mark.parametrize("objective", ["caption", "label", "siglip"])
def test_accumulation_gives_the_full_batch_loss_and_gradients(objective, prepared_synthetic):
    _assert_same(_gradients(objective, prepared_synthetic), _gradients(objective, prepared_synthetic, accum_steps=4))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, size: int, port: int, objective: str, prepared_dir: str, out: str,
            local_loss: bool = False) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    loss, grads = _gradients(objective, prepared_dir, world=World(rank, size), local_loss=local_loss)
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("objective, local_loss", [("caption", False), ("label", False), ("caption", True),
                                                   ("siglip", False)])
def test_two_gloo_processes_give_the_single_process_loss_and_gradients(objective, local_loss, prepared_synthetic,
                                                                      tmp_path):
    """Also with the local loss: each process computes only its own rows' terms, yet the averaged gradients
    and the reported loss are the full batch's."""
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), objective, str(prepared_synthetic), str(tmp_path),
                                               local_loss), nprocs=2, join=True)
    reference = _gradients(objective, prepared_synthetic)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_same(reference, (saved["loss"], saved["grads"]))


def _train_command(prepared_dir, model_folder, out) -> list[str]:
    return ["-m", "clipmed.cli", "train", "--data", str(prepared_dir), "--model", str(model_folder), "--batch-size",
            "8", "--epochs", "1", "--precision", "fp32", "--lr-new", "1e-3", "--lr-pretrained", "1e-3",
            "--out", str(out)]


def _train_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


@pytest.fixture(scope="module")
def single_process_run(prepared_synthetic, tiny_dual_folder, tmp_path_factory):
    """`clipmed train` in one process: the reference for the torchrun runs."""
    out = tmp_path_factory.mktemp("single") / "run"
    subprocess.run([sys.executable, *_train_command(prepared_synthetic, tiny_dual_folder, out)], check=True,
                   env=_train_env(), capture_output=True, timeout=300)
    return out


def _assert_same_model(run, reference) -> None:
    """Same global batches; only the reduction order differs."""
    trained = load_file(str(run / "model" / "model.safetensors"))
    single = load_file(str(reference / "model" / "model.safetensors"))
    assert trained.keys() == single.keys()
    for name in single:
        assert torch.allclose(trained[name].float(), single[name].float(), rtol=1e-3, atol=1e-5), name


def test_clipmed_train_runs_under_torchrun(prepared_synthetic, tiny_dual_folder, single_process_run, tmp_path):
    """The same `clipmed train` under torchrun with 2 CPU processes writes a complete run close to the
    single-process one."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), *_train_command(prepared_synthetic, tiny_dual_folder, tmp_path / "ddp")],
                   check=True, env=_train_env(), capture_output=True, timeout=300)
    _assert_same_model(tmp_path / "ddp", single_process_run)


def test_clipmed_train_across_two_nodes_with_c10d_rendezvous(prepared_synthetic, tiny_dual_folder,
                                                             single_process_run, tmp_path):
    """Two torchrun launchers, one per "node" with one process each, meet at a c10d rendezvous (no
    --node-rank): the multi-node launch, on one machine. Both write into one run folder as on a shared
    filesystem; rank 0 alone writes it, and the model is the single-process one."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "clipmed-test",
                *_train_command(prepared_synthetic, tiny_dual_folder, tmp_path / "nodes")]
    nodes = [subprocess.Popen(launcher, env=_train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0].decode(errors="replace") for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-2000:]
    assert json.loads((tmp_path / "nodes" / "run.json").read_text())["processes"] == 2
    _assert_same_model(tmp_path / "nodes", single_process_run)


def test_each_process_of_a_node_takes_its_own_gpu(monkeypatch):
    """Under torchrun with --device cuda, LOCAL_RANK picks the GPU (several processes per node, any node)."""
    import torch.distributed as dist

    from clipmed.training.distributed import init_world

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 7)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    assert init_world("cuda") == World(rank=7, size=8) and chosen == [3]
    assert init_world("cpu") == World(rank=7, size=8) and chosen == [3]  # CPU processes choose no GPU


def test_locked_tower_cache_trains_exactly_like_recomputing(prepared_synthetic, tiny_dual_folder, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("CLIPMED_CACHE", str(tmp_path / "cache"))
    base = dict(data=str(prepared_synthetic), model=str(tiny_dual_folder), objective="caption", epochs=2,
                batch_size=8, precision="fp32", lock_image=True, lr_new=3e-3)
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **base), progress=False)
    recomputed = train(TrainConfig(out=str(tmp_path / "plain"), feature_cache=False, **base), progress=False)
    assert len(list((tmp_path / "cache" / "features").glob("*/features.safetensors"))) == 1
    a = load_file(str(cached / "model" / "model.safetensors"))
    b = load_file(str(recomputed / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    again = train(TrainConfig(out=str(tmp_path / "again"), **base), progress=False)  # served from the disk cache
    c = load_file(str(again / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_local_loss_is_refused_for_objectives_other_than_caption(prepared_synthetic, tiny_dual_folder, tmp_path):
    from clipmed.errors import ClipmedError

    config = TrainConfig(data=str(prepared_synthetic), model=str(tiny_dual_folder), objective="label",
                         out=str(tmp_path / "run"), local_loss=True)
    with pytest.raises(ClipmedError, match="--local-loss applies to the caption objective"):
        train(config, progress=False)

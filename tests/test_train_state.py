"""TrainState, the one place a task's checkpoint is defined: save -> restore -> heal round
trips, bitwise, with a part the engine does not know of (EMA weights in Task.state).

The save goes through the writer's own path (the host-buffer snapshot, torch.save, the
weights-only load a resume uses), the heal through torchft's HTTP transport on loopback
(what a healing replica receives), the restore through workers/resume.py's restore."""

from __future__ import annotations

import io
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from workers.config import WorkerConfig
from workers.format import MODEL_FILE, STATE_FILE, Position, load_tensor_file
from workers.host_buffers import HostBuffers
from workers.resume import restore
from workers.state import TrainState
from workers.task import Task


def _cfg(**kw: Any) -> WorkerConfig:
    from orchestrator.core.storage import RetryPolicy

    base = dict(
        run_uri="file:///unused",
        storage_options={},
        retry=RetryPolicy(),
        task="t",
        task_options={},
        seed=3,
        epochs=4,
        use_gpu=False,
        monitor="val_loss",
        mode="min",
        early_stopping=(3, 0.0),
    )
    return WorkerConfig(**{**base, **kw})  # type: ignore[arg-type]


def _task(seed: int) -> Task:
    """A task with every part: optimizer, scheduler, grad scaler and EMA weights (Task.state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    return Task(
        model=model,
        optimizer=opt,
        train_data=data,
        val_data=data,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0),
        state={"ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))},
    )


def _train(state: TrainState, steps: int) -> None:
    t = state.task
    x, y = t.train_data.tensors  # type: ignore[union-attr]
    for i in range(steps):
        t.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(state.model(x[i * 8 : i * 8 + 8]), y[i * 8 : i * 8 + 8])
        t.grad_scaler.scale(loss).backward()
        t.grad_scaler.step(t.optimizer)
        t.grad_scaler.update()
        t.state["ema"].update_parameters(state.model)
        state.epoch_loss.add(loss.detach())
        state.step, state.global_step = state.step + 1, state.global_step + 1
    t.scheduler.step()
    state.metrics = {"val_loss": 0.25, "val_acc": 0.5}
    assert state.stopper is not None
    state.stopper.update(0.25)


def _tensors(obj: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a nested state, by path (tensors compared bitwise, the rest by value)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(val, f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _tensors(val, f"{path}/{i}").items()}
    return {path: obj}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    fa, fb = _tensors(a), _tensors(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if torch.is_tensor(fa[k]):
            assert torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype, k
        else:
            assert fa[k] == fb[k], k


def _full(state: TrainState) -> dict[str, Any]:
    return {**state.state_dict(), "ema": state.task.state["ema"].state_dict()}


def _written(files: dict[str, Any]) -> dict[str, bytes]:
    """What the writer puts in storage: a host-memory snapshot, torch.save of each file."""
    buffers = HostBuffers()
    snapshot = buffers.copy(files)
    buffers.wait()
    out = {}
    for name, tree in snapshot.items():
        buf = io.BytesIO()
        torch.save(tree, buf)
        out[name] = buf.getvalue()
    return out


def _state(seed: int, cfg: WorkerConfig) -> TrainState:
    return TrainState((t := _task(seed)), t.model, cfg, torch.device("cpu"))


def _round_trip(src: TrainState, at: Position, cfg: WorkerConfig) -> tuple[TrainState, Any, dict[str, bytes]]:
    """src saved at `at` through the writer's path, then restored into a state with other
    initial weights (seed 1) by workers/resume.py's restore."""
    blobs = _written(src.files(at, [src.rank_part(at)]))
    dst = _state(1, cfg)
    session = SimpleNamespace(cfg=cfg, rank=0, world=1, attempt=2, restored_files=lambda: blobs)
    return dst, restore(session, dst), blobs  # type: ignore[arg-type]


def test_save_then_restore_puts_every_part_back_bitwise_ema_included() -> None:
    cfg = _cfg()
    src = _state(0, cfg)
    _train(src, 5)
    dst, resumed, blobs = _round_trip(src, Position(1, 5, 5, False), cfg)
    assert "ema" in load_tensor_file(blobs[STATE_FILE])  # the new part, with no edit to the engine
    assert (resumed.start_epoch, resumed.start_step, resumed.restored) == (1, 5, True)
    _same(_full(src), _full(dst))
    assert dst.epoch_loss.state() == src.epoch_loss.state() and dst.global_step == 5
    assert dst.stopper is not None and dst.stopper.state() == src.stopper.state()  # type: ignore[union-attr]
    assert torch.equal(load_tensor_file(blobs[MODEL_FILE])["0.weight"], src.model[0].weight)


def test_a_heal_through_torchfts_transport_hands_on_every_part_bitwise() -> None:
    from torchft.checkpointing.http_transport import HTTPTransport

    cfg = _cfg()
    src = _state(0, cfg)
    src.epoch, src.reported = 2, 1
    _train(src, 3)
    sender, receiver = HTTPTransport(timedelta(seconds=10), 0), HTTPTransport(timedelta(seconds=10), 0)
    try:
        sender.send_checkpoint([1], 7, src.state_dict(), timedelta(seconds=10))
        got = receiver.recv_checkpoint(0, sender.metadata(), 7, timedelta(seconds=10))
    finally:
        sender.shutdown()
        receiver.shutdown()
    dst = _state(1, cfg)
    dst.load_state_dict(got)
    _same(_full(src), _full(dst))
    assert (dst.epoch, dst.step, dst.global_step, dst.reported) == (2, 3, 3, 1)
    assert dst.metrics == src.metrics and dst.epoch_loss.state() == src.epoch_loss.state()


def test_an_end_of_epoch_save_resumes_at_the_next_epoch_with_a_fresh_running_loss() -> None:
    cfg = _cfg()
    src = _state(0, cfg)
    _train(src, 4)
    dst, resumed, _ = _round_trip(src, Position(1, 4, 4, True), cfg)
    assert (resumed.start_epoch, resumed.start_step, dst.reported) == (2, 0, 1)
    assert dst.epoch_loss.state() == {"loss_sum": 0.0, "steps": 0}


def test_a_checkpoint_from_before_a_part_existed_leaves_that_part_fresh() -> None:
    cfg = _cfg()
    src = _state(0, cfg)
    _train(src, 2)
    at = Position(1, 2, 2, False)
    files = src.files(at, [src.rank_part(at)])
    del files[STATE_FILE]["ema"]  # written before the task grew EMA weights
    blobs = _written(files)
    dst = _state(1, cfg)
    fresh = {k: v.clone() for k, v in dst.task.state["ema"].state_dict().items()}
    restore(SimpleNamespace(cfg=cfg, rank=0, world=1, attempt=2, restored_files=lambda: blobs), dst)  # type: ignore[arg-type]
    _same(fresh, dst.task.state["ema"].state_dict())
    _same(src.model.state_dict(), dst.model.state_dict())


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"optimizer": AveragedModel(nn.Linear(1, 1))}, "'optimizer' cannot name a part"),
        ({"not an id": AveragedModel(nn.Linear(1, 1))}, "'not an id' cannot name a part"),
        ({"ema": [1, 2]}, "Task.state['ema']: a list has no state_dict()"),
    ],
)
def test_task_state_refuses_a_reserved_name_or_a_part_without_state_dict(
    state: dict[str, Any], field: str
) -> None:
    model = nn.Linear(2, 2)
    data = torch.utils.data.TensorDataset(torch.randn(4, 2))
    with pytest.raises(ValueError, match="Task.state") as e:
        Task(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_data=data,
            val_data=data,
            state=state,
        )
    assert field in str(e.value)

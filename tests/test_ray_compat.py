"""The private Ray APIs this project leans on still exist where orchestrator/ray_compat.py
looks for them. When a Ray upgrade moves one, this fails naming it."""

from __future__ import annotations

import importlib

import pytest

PRIVATE = [
    ("ray._raylet", "Config"),
    ("ray.train.v2._internal.execution.callback", "ControllerCallback"),
    ("ray.train.v2._internal.execution.callback", "WorkerCallback"),
    ("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer"),
    ("ray.train.v2._internal.execution.controller.state", "TrainControllerStateType"),
    (
        "ray._private.authentication.grpc_authentication_client_interceptor",
        "_get_authentication_metadata_tuple",
    ),
    ("ray.core.generated.gcs_service_pb2", "GetClusterIdRequest"),
    ("ray.core.generated.gcs_service_pb2_grpc", "NodeInfoGcsServiceStub"),
    ("ray.experimental.internal_kv", "_internal_kv_get"),
    ("ray.autoscaler.v2.sdk", "get_cluster_status"),
    ("ray._common.utils", "get_ray_address_file"),
    ("ray.train.v2.torch.torchft_config", "TorchftConfig"),
    ("ray.train.v2.torch.torchft_config", "_TorchftBackend"),
    ("ray.train.v2._internal.execution.failure_handling", "DefaultFailurePolicy"),
    ("ray.train.v2._internal.execution.failure_handling.default", "_is_preemption_failure"),
    ("ray.train.v2._internal.execution.failure_handling.failure_policy", "FailureDecision"),
    ("ray._private.worker", "print_to_stdstream"),
    ("ray._private.authentication.authentication_token_setup", "logger"),
]


@pytest.mark.parametrize("module, name", PRIVATE)
def test_private_ray_api_is_still_there(module, name):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is gone in this Ray ({e}); update orchestrator/ray_compat.py")
    assert hasattr(mod, name), f"{module}.{name} is gone in this Ray; update orchestrator/ray_compat.py"


def test_restart_state_and_hook_exist():
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import TrainControllerStateType

    assert hasattr(TrainControllerStateType, "RESTARTING"), "no RESTARTING controller state"
    assert hasattr(ControllerCallback, "after_controller_state_update"), "hook renamed"


def test_restart_recorder_builds():
    from orchestrator.ray_compat import restart_recorder

    rec = restart_recorder(coordinator=None)
    assert type(rec).__name__ == "RestartRecorder"


def test_a_failure_of_every_worker_is_a_whole_restart_in_a_replicas_run():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.ray_compat import every_worker_failed

    both = WorkerGroupError("x", {0: RuntimeError(), 1: RuntimeError()})
    one = WorkerGroupError("x", {1: RuntimeError()})
    assert every_worker_failed(both, 2)
    assert not every_worker_failed(one, 2)  # a replica replaced alone
    assert not every_worker_failed(both, None)  # not a replicas run
    assert not every_worker_failed(RuntimeError("controller"), 2)  # no worker failures to count


def test_preemption_listener_builds_and_hooks_the_worker():
    from ray.train.v2._internal.execution.callback import WorkerCallback

    from orchestrator.ray_compat import preemption_listener

    assert hasattr(WorkerCallback, "after_init_train_context"), "hook renamed"
    assert type(preemption_listener()).__name__ == "PreemptionListener"


def test_ray_trains_sigint_handler_can_be_kept_off():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from orchestrator.ray_compat import keep_driver_sigint

    assert hasattr(DataParallelTrainer, "_register_sigint_handler"), "Ray Train's SIGINT hook renamed"

    class Trainer:
        def _register_sigint_handler(self, controller):
            raise AssertionError("Ray's handler was installed")

    t = Trainer()
    keep_driver_sigint(t)
    t._register_sigint_handler(None)  # now a no-op
    with pytest.raises(RuntimeError, match="ray_compat"):
        keep_driver_sigint(object())


def test_the_controller_poll_interval_reaches_the_controller(monkeypatch):
    import inspect

    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.train.v2._internal.execution.controller.controller import TrainController

    from orchestrator.ray_compat import controller_poll_env

    env = controller_poll_env(0.25)
    assert env == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # What fit() hands the controller actor as its environment, from the driver's.
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
    # And the controller reads it when it is built, as its poll interval.
    assert "HEALTH_CHECK_INTERVAL_S_ENV_VAR" in inspect.getsource(TrainController.__init__)


def test_current_cluster_reads_the_marker_ray_itself_reads(tmp_path, monkeypatch):
    from ray._private.utils import read_ray_address, write_ray_address

    from orchestrator.ray_compat import current_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir: never the real /tmp/ray here
    marker = tmp_path / "ray" / "ray_current_cluster"
    assert current_cluster() == (str(marker), None)
    marker.parent.mkdir()
    write_ray_address("127.0.0.1:6379")  # as `ray start --head` records its GCS
    assert current_cluster() == (str(marker), "127.0.0.1:6379") and read_ray_address() == "127.0.0.1:6379"
    marker.write_text("")
    assert current_cluster() == (str(marker), None)


def test_worker_lines_and_the_raylets_errors_go_through_the_printer_we_replace():
    """route_worker_output replaces ray._private.worker.print_to_stdstream before ray.init; the
    log handler ray.init installs binds it then, and the raylet's error listener looks it up
    by name; the token-auth notice still comes from the logger we filter (its text too)."""
    import inspect

    import ray._private.authentication.authentication_token_setup as auth
    import ray._private.worker as ray_worker

    from orchestrator.ray_compat import TOKEN_NOTICE

    assert "print_to_stdstream" in inspect.getsource(ray_worker.listen_error_messages)
    assert "functools.partial(print_to_stdstream" in inspect.getsource(ray_worker.connect)
    assert auth.logger.name == "ray._private.authentication.authentication_token_setup"
    assert TOKEN_NOTICE in inspect.getsource(auth)


def test_the_lighthouse_backend_overrides_the_method_ray_calls():
    """Ray's torchft backend still creates its lighthouse through the method replaced here, on
    every start of a group or a replacement (so a restarted or re-placed one is found)."""
    import inspect

    from ray.train.v2.torch.torchft_config import _TorchftBackend

    from orchestrator.ray_compat import torchft_config

    backend = torchft_config(2000).backend_cls
    assert issubclass(backend, _TorchftBackend)
    assert "_maybe_create_lighthouse_actor" in vars(backend)
    assert "self._maybe_create_lighthouse_actor(" in inspect.getsource(_TorchftBackend.on_start)
    assert "lighthouse_actor" in vars(_TorchftBackend()), "Ray's backend no longer holds its actor there"


HEAD, W1, W2 = "aa-head", "bb-worker", "cc-worker"


@pytest.mark.parametrize(
    ("nodes", "here", "workers", "chosen"),
    [
        ([(HEAD, True)], HEAD, {HEAD}, HEAD),  # one node: the driver's own
        ([(HEAD, True), (W1, True)], HEAD, set(), W1),  # another alive node: off the driver's
        ([(HEAD, True), (W1, False)], HEAD, set(), HEAD),  # the other is dead: the driver's
        ([(W2, True), (HEAD, True), (W1, True)], HEAD, set(), W1),  # several: the first by node id
        ([(HEAD, True), (W1, False), (W2, True)], HEAD, set(), W2),  # a dead one is skipped
        ([(W1, True), (HEAD, True)], W1, set(), HEAD),  # the driver on a worker node: the head
        # never on a worker's node: it would be lost with that node, and every survivor with it
        ([(HEAD, True), (W1, True), (W2, True)], HEAD, {W1}, W2),
        ([(HEAD, True), (W1, True), (W2, True)], HEAD, {W1, W2}, HEAD),
        ([(HEAD, True), (W1, True)], HEAD, {HEAD, W1}, HEAD),
    ],
)
def test_the_lighthouse_is_placed_off_the_drivers_node_when_another_is_free(nodes, here, workers, chosen):
    from orchestrator.ray_compat import lighthouse_node

    listed = [{"NodeID": node, "Alive": alive} for node, alive in nodes]
    assert lighthouse_node(listed, here, workers) == chosen


def test_a_free_port_is_one_a_server_can_bind():
    import socket

    from orchestrator.ray_compat import free_port

    port = free_port()
    with socket.socket() as s:
        s.bind(("", port))


def test_the_failed_ranks_of_a_worker_group_error():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from orchestrator.ray_compat import failed_ranks

    assert failed_ranks(WorkerGroupError("w", {2: RuntimeError("x"), 0: RuntimeError("y")})) == [0, 2]
    assert failed_ranks(ControllerError(RuntimeError("x"))) == []
    assert failed_ranks(None) == []


def test_the_trainer_still_hands_its_failure_policy_to_the_controller():
    import inspect

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert hasattr(DataParallelTrainer, "_initialize_and_run_controller"), "renamed"
    assert "failure_policy=create_failure_policy(" in inspect.getsource(DataParallelTrainer.fit)

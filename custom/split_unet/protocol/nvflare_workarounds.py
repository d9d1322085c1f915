"""Work-arounds of measured NVFlare 2.9 defects, applied by the server's controller and each site's executor when
their process starts. Each names the defect, what it costs, and the test that notices when NVFlare fixes it."""

from __future__ import annotations

from collections.abc import Callable

from nvflare.apis.fl_constant import ReservedTopic
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.fuel.utils.buffer_list import ConsumableBufferList


def _buffers_summary(buffers: ConsumableBufferList) -> str:
    return f"<{type(buffers).__name__}: {len(buffers)} buffers, {sum(len(b) for b in buffers)} bytes>"


def short_received_buffer_repr() -> None:
    """Make the repr of a received message's chunks a one-line summary.

    NVFlare 2.9's ``Adapter.call`` (``nvflare/fuel/f3/cellnet/cell.py``) builds ``f"... incoming data={result}"``
    for a debug line on every streamed request it receives, whatever the log level. ``result`` is the received
    ``ConsumableBufferList``, a ``list`` of the payload's chunks, so the f-string is the repr of every byte of the
    message: 118 ms of CPU and a 33 MB string for one site's 11 MB of activations (``docs/performance.md``),
    paid by the server for every site at every step. A job cannot set NVFlare's log level low enough to skip an
    f-string; the class's repr, used by nothing but such log lines, is what this process can change.
    (``tests/test_metrics_and_wire.py`` fails once NVFlare stops formatting the payload: then remove this.)
    """
    ConsumableBufferList.__repr__ = _buffers_summary


def screen_pushed_tasks(engine, refusal: Callable[[Shareable, FLContext], Shareable | None]) -> None:
    """Let ``refusal`` see every task pushed to this site (``ReservedTopic.DO_TASK``) before NVFlare runs it.

    NVFlare 2.9's ``ClientRunner._handle_do_task`` (``nvflare/private/fed/client/client_runner.py``) runs any
    well-formed ``DO_TASK`` request through the site's filters and executor, whoever sent it: another site's code
    can push a split request with ``engine.send_aux_request`` and read the activations in the reply, or hand the
    site gradients to train on, without the server (measured in the simulator: ``tests/test_task_sender.py``). The
    check must come before the site's filters, which keep state (the hijack detector's alarm), so it wraps the
    handler in this process's aux table rather than the executor. ``refusal`` returns the reply that refuses the
    request, or None to run it. (``tests/test_task_sender.py::test_nvflare_runs_a_task_pushed_by_any_sender``
    fails once NVFlare checks the sender itself: then remove this.)
    """
    aux_runner = engine.aux_runner
    with aux_runner.reg_lock:
        handler = aux_runner.topic_table[ReservedTopic.DO_TASK]

        def screened(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
            refused = refusal(request, fl_ctx)
            return refused if refused is not None else handler(topic=topic, request=request, fl_ctx=fl_ctx)

        aux_runner.topic_table[ReservedTopic.DO_TASK] = screened


def apply_task_check_period(controller: Controller, period: float) -> None:
    """Make the server poll its tasks every ``period`` seconds, as ``Controller(task_check_period=...)`` means to.

    NVFlare 2.9's ``Controller.set_communicator`` (``nvflare/apis/impl/controller.py``) writes
    ``communicator.task_check_period``, an attribute nothing reads: ``WFCommServer``
    (``nvflare/apis/impl/wf_comm_server.py``) sleeps its own ``_task_check_period`` (0.2 s) in ``_monitor_tasks``,
    which marks a task done once its results are in, and in ``wait_for_task``. A round trip then idles up to about
    0.4 s after the last site answered. Called where the controller starts, after NVFlare set its communicator.
    (``tests/test_task_check_period.py::test_nvflare_ignores_the_controllers_task_check_period`` fails once NVFlare
    passes the period on: then remove this.)
    """
    controller.communicator._task_check_period = period

"""How the server's requests reach the sites and their answers come back: NVFlare tasks, polled or pushed.

Both routes run every filter a polled NVFlare task runs: at the site, the site's privacy scope and the job's site
filters, in and out (NVFlare's ``ClientRunner._do_task``); at the server, the job's server filters (the gradient
protection, the leakage recorder) and, where the server has a privacy policy, its scope's.

- ``PolledTasks`` (``transport="poll"``): NVFlare's task route. The server queues a task per site; each site asks
  for work every ``task_request_interval``, runs it and sends the result in a second message. A round trip waits
  for the sites' next ask, for NVFlare's task check and for the result's own message.
- ``PushedTasks`` (``transport="push"``): each site's request goes out at once as NVFlare's ``ReservedTopic.DO_TASK``
  aux message, which every NVFlare site hands to the same ``_do_task`` as a polled task, and the filtered result
  comes back as the reply. NVFlare's server task route would apply the server's own filters; here they are
  applied by ``PushedTasks`` itself with NVFlare's ``apply_filters``, on every request and every reply.

Either way an answer is a ``Shareable`` (the site's result, or its error), or a ``str`` saying why none came:
the site is then lost (``SiteRounds.lose``).
"""

from __future__ import annotations

import threading
import time
import uuid

from nvflare.apis.controller_spec import ClientTask, Task, TaskCompletionStatus
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey, ReservedTopic, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.private.privacy_manager import Scope

from split_unet.errors import ProtocolError

TRANSPORTS = ("poll", "push")
# Return codes of a pushed request that no site sent: NVFlare's cell found no answer in time or could not deliver.
NOT_ANSWERED = (ReturnCode.TIMEOUT, ReturnCode.COMMUNICATION_ERROR)
# ... and the code of a site's job process that has no handler for pushed tasks yet.
NOT_READY = (ReturnCode.TOPIC_UNKNOWN,)
START_RETRY_SECONDS = 0.5  # between requests to a site whose job process is still starting

Answers = dict[str, "Shareable | str"]


class PolledTasks:
    """NVFlare's task route: every site its own ``Task``, all in flight at once, then each waited for."""

    def __init__(self, controller: Controller):
        self.controller = controller

    def exchange(self, task_name: str, payloads: dict[str, Shareable], timeout: int, abort_signal: Signal,
                 fl_ctx: FLContext) -> Answers:
        tasks = {site: Task(task_name, data, timeout=timeout) for site, data in payloads.items()}
        for site, task in tasks.items():
            self.controller.broadcast(task, fl_ctx, targets=[site], min_responses=1)
        answers: Answers = {}
        for site, task in tasks.items():
            self.controller.communicator.wait_for_task(task, abort_signal)
            if abort_signal.triggered:
                return answers
            client_tasks: list[ClientTask] = task.client_tasks
            result = client_tasks[0].result if client_tasks else None
            if result is None:
                result = ("no answer within the task timeout of %d s" % timeout
                          if task.completion_status == TaskCompletionStatus.TIMEOUT
                          else f"task ended with status {task.completion_status}")
            answers[site] = result
        return answers


class PushedTasks:
    """Every site's request pushed at once (``DO_TASK``), the server's own job filters applied on the way out and
    on the way back, as NVFlare's server task route applies them."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self.reached: set[str] = set()  # sites that have answered a pushed request in this run

    def _deliver(self, engine, site: str, request: Shareable, timeout: int, abort_signal: Signal) -> Shareable | None:
        """The site's reply to ``request`` within ``timeout`` seconds. A site's job process starts after the server's
        workflow (the polled route waits for its first ask): until a site first answers, a request it could not
        take yet (no connection to its job, or no task handler yet) is sent again."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1.0, deadline - time.monotonic())
            with engine.new_context() as send_ctx:
                reply = engine.send_aux_request(targets=[site], topic=ReservedTopic.DO_TASK, request=request,
                                                timeout=left, fl_ctx=send_ctx).get(site)
            code = reply.get_return_code(ReturnCode.OK) if reply is not None else None
            if reply is not None and code not in NOT_ANSWERED + NOT_READY:
                self.reached.add(site)
            starting = site not in self.reached and (reply is None or code in NOT_ANSWERED + NOT_READY)
            if not starting or abort_signal.triggered or time.monotonic() + START_RETRY_SECONDS > deadline:
                return reply
            time.sleep(START_RETRY_SECONDS)

    def exchange(self, task_name: str, payloads: dict[str, Shareable], timeout: int, abort_signal: Signal,
                 fl_ctx: FLContext) -> Answers:
        engine, filters = fl_ctx.get_engine(), fl_ctx.get_prop(FLContextKey.RUNNER).config
        requests, task_ids = {}, {}
        for site, data in payloads.items():
            task_ids[site] = str(uuid.uuid4())
            with engine.new_context() as site_ctx:
                self._as_task_of(site_ctx, site, task_name, task_ids[site], fl_ctx)
                site_ctx.set_prop(FLContextKey.TASK_DATA, data, private=True, sticky=False)
                try:
                    request = apply_filters(Scope.TASK_DATA_FILTERS_NAME, data, site_ctx, filters.task_data_filters,
                                            task_name, FilterKey.OUT, abort_signal=abort_signal)
                except Exception as error:  # NVFlare's route would retry the filter forever; the run stops instead
                    raise ProtocolError(f"the server's task data filters refused the request: "
                                        f"{type(error).__name__}: {error}", site=site, field=task_name) from error
            request.set_header(ReservedHeaderKey.TASK_NAME, task_name)
            request.set_header(ReservedHeaderKey.TASK_ID, task_ids[site])
            requests[site] = request
        # One request per site, all in flight at once. NVFlare 2.9's engine.multicast_aux_requests, made for this,
        # fails on every call (its AuxRunner passes CoreCell.broadcast_multi_requests an abort_signal argument that
        # method does not take), so each site's request is sent on a thread of its own.
        replies: dict[str, Shareable | None] = {}

        def deliver(site: str) -> None:
            replies[site] = self._deliver(engine, site, requests[site], timeout, abort_signal)

        senders = [threading.Thread(target=deliver, args=(site,), name=f"push-{site}", daemon=True)
                   for site in requests]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        answers: Answers = {}
        for site in payloads:
            reply = replies.get(site)
            code = reply.get_return_code(ReturnCode.OK) if reply is not None else None
            if reply is None or code in NOT_ANSWERED + NOT_READY:
                answers[site] = (f"no answer within the task timeout of {timeout} s" if code == ReturnCode.TIMEOUT
                                 else f"the pushed task was not delivered or not answered ({code or 'no reply'})")
                continue
            with engine.new_context() as site_ctx:
                self._as_task_of(site_ctx, site, task_name, task_ids[site], fl_ctx)
                site_ctx.set_prop(FLContextKey.TASK_RESULT, reply, private=True, sticky=False)
                try:
                    answers[site] = apply_filters(Scope.TASK_RESULT_FILTERS_NAME, reply, site_ctx,
                                                  filters.task_result_filters, task_name, FilterKey.IN,
                                                  abort_signal=abort_signal)
                except Exception as error:  # as NVFlare's route: the result becomes a filter error
                    self.controller.log_exception(site_ctx, f"task result filter failed on {site}'s answer: {error}")
                    answers[site] = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        return answers

    @staticmethod
    def _as_task_of(site_ctx: FLContext, site: str, task_name: str, task_id: str, fl_ctx: FLContext) -> None:
        """The context a filter sees on NVFlare's task route: the task, and the site as the peer."""
        peer = FLContext()
        peer.set_public_props({ReservedKey.IDENTITY_NAME: site, ReservedKey.RUN_NUM: fl_ctx.get_job_id()})
        site_ctx.set_peer_context(peer)
        site_ctx.set_prop(FLContextKey.TASK_NAME, task_name, private=True, sticky=False)
        site_ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)


def make_transport(name: str, controller: Controller) -> PolledTasks | PushedTasks:
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")
    return PushedTasks(controller) if name == "push" else PolledTasks(controller)

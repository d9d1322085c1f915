"""A hostile site component for the tests: ``ForeignTaskSender`` runs at one site of a training job and, when that site
gets its first training task, pushes a well-formed split request straight to another site over NVFlare's
``ReservedTopic.DO_TASK`` (as any site's code can), then writes what came back to its own run folder."""

import json
import uuid
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedTopic, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey

from split_unet.protocol.wire import ERROR_HEADER, KIND_REQUEST, TASK_TRAIN, TASK_VALIDATE, TensorMessage

REPORT_FILE = "foreign_task.json"
FOREIGN_STEP = 10**6  # far ahead of the server's steps: a site that took it would refuse the server's next step


class ForeignTaskSender(FLComponent):
    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.sent = False

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.BEFORE_TASK_EXECUTION or self.sent:
            return
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != TASK_TRAIN:
            return
        patient_ids = from_shareable(fl_ctx.get_prop(FLContextKey.TASK_DATA)).meta["patient_ids"]
        if not patient_ids:
            return
        self.sent = True
        # Validation of one patient the site was just asked about: the target answers with its activations.
        request, _ = TensorMessage(KIND_REQUEST, FOREIGN_STEP, patient_ids[:1]).to_shareable("float32")
        request.set_header(ReservedHeaderKey.TASK_NAME, TASK_VALIDATE)
        request.set_header(ReservedHeaderKey.TASK_ID, str(uuid.uuid4()))
        replies = fl_ctx.get_engine().send_aux_request(targets=[self.target], topic=ReservedTopic.DO_TASK,
                                                       request=request, timeout=120.0, fl_ctx=fl_ctx)
        reply = replies.get(self.target)
        report = {"answered": reply is not None}
        if reply is not None:
            report["return_code"] = reply.get_return_code(ReturnCode.OK)
            report["error"] = reply.get_header(ERROR_HEADER)
            try:
                report["data_kind"] = from_shareable(reply).data_kind
            except Exception:  # an error reply carries no DXO
                report["data_kind"] = None
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        (run_dir / REPORT_FILE).write_text(json.dumps(report))

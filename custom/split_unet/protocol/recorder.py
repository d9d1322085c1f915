"""Server-side recorder of what an honest-but-curious server receives and sends (leakage evaluation).

An NVFlare ``Filter`` placed last in the server's filter chains, so it sees the activations after every
filter on the way in (``task_result_filters``) and the gradients after every filter on the way out
(``task_data_filters``). It never changes a payload. It records the training steps it is told
(negative = from the end), at most ``max_patients`` per step, into the run folder's ``leakage_record/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from split_unet.leakage.record import RECORD_FOLDER, RecordedExchange, step_folder

from .codecs import MAX_ELEMENTS
from .wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage, selected_step


class LeakageRecorder(Filter):
    """Args:
        max_elements: the largest tensor a training message may carry (``rounds.largest_training_tensor``
            of the job's ``train`` settings, which ``jobs.build_training`` fills in): the controller's bound, applied
            here too, since this filter decodes a site's message before the controller sees it.
        steps: training steps to record (1-based; -1 = the last one).
        max_patients: patients kept per recorded step (bounds the record's size).
    """

    def __init__(self, max_elements: int, steps: Sequence[int] = (1, -1), max_patients: int = 2):
        super().__init__()
        if not isinstance(max_elements, int) or not 0 < max_elements <= MAX_ELEMENTS:
            raise ValueError(f"max_elements must be an integer in [1, {MAX_ELEMENTS}], got {max_elements!r}")
        self.max_elements = max_elements
        self.steps = list(steps)
        self.max_patients = max_patients

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO: not ours to record
            return shareable
        if dxo.data_kind not in (KIND_ACTIVATIONS, KIND_REQUEST):
            return shareable
        # Decide from the metadata alone, so that the payloads of steps not recorded are never decoded.
        info = (dxo.meta or {}).get("info")
        info = info if isinstance(info, dict) else {}
        step_key = "train_step" if dxo.data_kind == KIND_ACTIVATIONS else "gradient_train_step"
        train_step = selected_step(self.steps, info.get(step_key), info.get("train_steps"))
        if train_step is None or not dxo.data:  # no tensors: a site left out of the step (modality dropout)
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown"
        message = TensorMessage.from_shareable(shareable, dxo.data_kind, site=site, max_elements=self.max_elements)
        record_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / RECORD_FOLDER
        if dxo.data_kind == KIND_ACTIVATIONS:
            n = self.max_patients
            RecordedExchange(train_step, site, message.patient_ids[:n],
                             {level: t[:n].clone() for level, t in message.tensors.items()}).save(record_dir)
            return shareable
        path = record_dir / step_folder(train_step) / f"{site}.pt"
        if path.is_file():
            exchange = RecordedExchange.load(path)
            n = len(exchange.patient_ids)
            exchange.gradients = {level: t[:n].clone() for level, t in message.tensors.items()}
            exchange.save(record_dir)
        return shareable

"""Wire format: what travels between the server and a site, and the checks on everything received.

Every message is one DXO. Tensors travel as raw bytes keyed by U-Net level (``"0"``, ``"1"``, ...;
top-k adds ``"0:indices"``), each encoded by a codec (``codecs``: float32 exact, scaled float16, int8
per channel, top-k) that ``meta["encodings"]`` names with its scale, shape and any lossless compression
(``TrainConfig.activation_compression``: the sites' activations).

- server -> site, task ``split_unet_init``: DXO ``split_unet.init`` with the run configuration.
- server -> site, tasks ``split_unet_train`` / ``split_unet_validate`` / ``split_unet_finish``: DXO
  ``split_unet.gradients``: the gradient of the site's previous activations (possibly none), and the
  patient ids and step number of the next batch. A training task without patients only delivers the
  gradient (a site left out of the step by modality dropout; with ``info["checkpoint"]``, a checkpoint).
  The first batch's ``info["agreed_patients"]`` names the patients every party holds: the only ones a
  site then answers for.
- server -> site, task ``split_unet_infer`` (inference job): as ``split_unet_validate``. Each patient's source
  affine and shape (header data, no image) reached the server once, in the site's init reply.
- site -> server: DXO ``split_unet.activations``: the site's features of the requested batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

from split_unet.errors import ProtocolError
from split_unet.ids import check_patient_ids, is_integer

from . import codecs

TASK_INIT = "split_unet_init"
TASK_TRAIN = "split_unet_train"
TASK_VALIDATE = "split_unet_validate"
TASK_FINISH = "split_unet_finish"
TASK_INFER = "split_unet_infer"
TASKS = (TASK_INIT, TASK_TRAIN, TASK_VALIDATE, TASK_FINISH, TASK_INFER)

KIND_INIT = "split_unet.init"
# The server's request of every task after init: the gradient of the site's last activations (possibly none) and the
# next batch. The value is the one recorded runs and site logs carry.
KIND_REQUEST = "split_unet.gradients"
KIND_ACTIVATIONS = "split_unet.activations"
KIND_SITE_INFO = "split_unet.site_info"

ERROR_HEADER = "split_unet.error"
# A data key: a level in ASCII digits (``str.isdigit`` also accepts "²", which ``int`` refuses), then the
# codec's optional suffix.
DATA_KEY = re.compile(r"(0|[1-9][0-9]{0,5})(" + re.escape(codecs.INDICES_SUFFIX) + ")?")


@dataclass
class TensorMessage:
    """Per-level tensors plus the bookkeeping of one exchange (see module docstring)."""

    kind: str
    step: int
    patient_ids: list[str]
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    tensor_step: int | None = None  # for gradients: the step whose activations they belong to
    info: dict = field(default_factory=dict)  # e.g. {"train_step": k, "train_steps": n} on training tasks
    wire_bytes: int = 0  # bytes of the tensor payload as sent or received

    def to_shareable(self, codec: str, keep_fraction: float = 0.1,
                     compression: str | None = None) -> tuple[Shareable, int]:
        """-> (shareable, bytes of tensor payload as sent). ``codec``: see ``codecs`` (float32 is exact);
        ``compression``: None or one of ``codecs.COMPRESSIONS`` (lossless)."""
        dxo, n_bytes = self.to_dxo(codec, keep_fraction, compression)
        return dxo.to_shareable(), n_bytes

    def to_dxo(self, codec: str, keep_fraction: float = 0.1, compression: str | None = None) -> tuple[DXO, int]:
        data, encodings = {}, {}
        for level, tensor in self.tensors.items():
            arrays, encodings[str(level)] = codecs.encode(tensor, codec, keep_fraction, compression)
            data.update({f"{level}{suffix}": array for suffix, array in arrays.items()})
        meta = {"step": self.step, "patient_ids": list(self.patient_ids), "encodings": encodings,
                "tensor_step": self.tensor_step, "info": dict(self.info)}
        self.wire_bytes = codecs.nbytes(data)
        return DXO(data_kind=self.kind, data=data, meta=meta), self.wire_bytes

    @classmethod
    def from_shareable(cls, shareable: Shareable, kind: str, *, site: str | None,
                       max_elements: int = codecs.MAX_ELEMENTS) -> "TensorMessage":
        """The checked message; any tensor declared larger than ``max_elements`` is refused before decoding."""
        dxo = dxo_of(shareable, kind, site=site)
        meta = dxo.meta or {}
        step = meta.get("step")
        if not is_integer(step):
            raise ProtocolError(f"step must be an integer, got {step!r}", site=site, field="step")
        patient_ids = check_patient_ids(meta.get("patient_ids"), site=site, field="patient_ids", error=ProtocolError)
        tensor_step = meta.get("tensor_step")
        if tensor_step is not None and not is_integer(tensor_step):
            raise ProtocolError(f"tensor_step must be an integer, got {tensor_step!r}", site=site,
                                field="tensor_step")
        info = meta.get("info") or {}
        if not isinstance(info, Mapping):
            raise ProtocolError("info must be a mapping", site=site, field="info")
        encodings = meta.get("encodings")
        if not isinstance(encodings, Mapping):
            raise ProtocolError("encodings missing", site=site, field="encodings")
        by_level: dict[int, dict[str, object]] = {}
        for key, array in dxo.data.items():
            match = DATA_KEY.fullmatch(key) if isinstance(key, str) else None
            if match is None:
                raise ProtocolError(f"unexpected key {key!r}: levels are non-negative integers", site=site,
                                    field=kind)
            by_level.setdefault(int(match[1]), {})[match[2] or ""] = array
        tensors = {level: codecs.decode(arrays, encodings.get(str(level)), site=site, field_name=f"{kind}[{level}]",
                                        max_elements=max_elements)
                   for level, arrays in by_level.items()}
        wire_bytes = codecs.nbytes(dxo.data)  # every value was checked to be an array by its decode
        return cls(kind=kind, step=step, patient_ids=patient_ids, tensors=tensors, tensor_step=tensor_step,
                   info=dict(info), wire_bytes=wire_bytes)


def resolve_steps(steps: Sequence[int], total: int) -> set[int]:
    """Training steps 1..total; negative entries count from the end (-1 = the last step)."""
    return {step if step > 0 else total + 1 + step for step in steps if step != 0}


def selected_step(steps: Sequence[int], train_step: object, total: object) -> int | None:
    """``train_step`` if it is one of ``steps`` (resolved against ``total`` training steps), else None.

    Both numbers come from a message's ``info``, so anything but integers selects nothing.
    """
    if isinstance(train_step, int) and isinstance(total, int) and train_step in resolve_steps(steps, total):
        return train_step
    return None


def dxo_of(shareable: Shareable, kind: str, *, site: str | None) -> DXO:
    """The DXO in a reply, or a ProtocolError carrying the site's own error message."""
    if not isinstance(shareable, Shareable):
        raise ProtocolError(f"expected a Shareable, got {type(shareable).__name__}", site=site, field=kind)
    return_code = shareable.get_return_code(ReturnCode.OK)
    if return_code != ReturnCode.OK:
        message = shareable.get_header(ERROR_HEADER) or f"return code {return_code}"
        raise ProtocolError(f"site reported an error: {message}", site=site, field=kind)
    try:
        dxo = from_shareable(shareable)
    except Exception as error:  # NVFlare raises bare ValueError/TypeError for a non-DXO payload
        raise ProtocolError(f"not a DXO ({error})", site=site, field=kind) from error
    if dxo.data_kind != kind:
        raise ProtocolError(f"expected data kind {kind!r}, got {dxo.data_kind!r}", site=site, field="data_kind")
    return dxo


def check_features(features: Mapping[int, torch.Tensor], expected: Mapping[int, tuple[int, ...]], *,
                   site: str | None, field_name: str = "activations") -> None:
    """Levels and shapes must be exactly those expected: ``{level: (B, C_l, *S_l)}``."""
    if set(features) != set(expected):
        raise ProtocolError(f"levels {sorted(features)} != expected {sorted(expected)}", site=site,
                            field=field_name)
    for level, shape in expected.items():
        if tuple(features[level].shape) != tuple(shape):
            raise ProtocolError(f"shape {tuple(features[level].shape)} != expected {tuple(shape)}", site=site,
                                field=f"{field_name}[{level}]")


def read_activations(reply: Shareable, *, site: str, step: int, patient_ids: list[str],
                     expected: Mapping[int, tuple[int, ...]]) -> TensorMessage:
    """The server's checks of one site's answer: the message itself, its step and patient ids, then exactly
    the ``expected`` levels and shapes. Nothing larger than the largest expected tensor is decoded."""
    largest = max((math.prod(shape) for shape in expected.values()), default=0)
    message = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site=site, max_elements=largest)
    if message.step != step:
        raise ProtocolError(f"answer for step {message.step} does not match request step {step}", site=site,
                            field="step")
    if message.patient_ids != patient_ids:
        raise ProtocolError("answer for other patients than requested", site=site, field="patient_ids")
    check_features(message.tensors, expected, site=site)
    return message


def error_reply(message: str) -> Shareable:
    """A reply that tells the server what went wrong at the site."""
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(ERROR_HEADER, message)
    return reply

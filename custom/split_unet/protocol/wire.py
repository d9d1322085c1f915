"""Wire format: what travels between the server and a site, and the checks on everything received.

Every message is one DXO. Tensors travel as numpy arrays (NVFlare serialises them natively, with no
decomposer to register), keyed by U-Net level. Each array carries a scale: float16 on the wire sends
``x / max|x|``, so gradients that are far smaller than float16's smallest normal number (6e-5) keep their
precision; float32 sends ``x`` with scale 1 and is exact.

- server -> site, task ``split_unet_init``: DXO ``split_unet.init`` with the run configuration.
- server -> site, tasks ``split_unet_train`` / ``split_unet_validate`` / ``split_unet_finish``: DXO
  ``split_unet.gradients``: the gradient of the site's previous activations (possibly none), and the
  patient ids and step number of the next batch.
- site -> server: DXO ``split_unet.activations``: the site's features of the requested batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply

from split_unet.errors import ProtocolError

TASK_INIT = "split_unet_init"
TASK_TRAIN = "split_unet_train"
TASK_VALIDATE = "split_unet_validate"
TASK_FINISH = "split_unet_finish"
TASKS = (TASK_INIT, TASK_TRAIN, TASK_VALIDATE, TASK_FINISH)

KIND_INIT = "split_unet.init"
KIND_GRADIENTS = "split_unet.gradients"
KIND_ACTIVATIONS = "split_unet.activations"
KIND_SITE_INFO = "split_unet.site_info"

ERROR_HEADER = "split_unet.error"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def encode_tensor(tensor: torch.Tensor, wire_dtype: str) -> tuple[np.ndarray, float]:
    """Tensor -> (array in the wire dtype, scale) with ``tensor ~= array * scale``."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    values = tensor.detach().to("cpu", torch.float32).numpy()
    if wire_dtype == "float32":
        return values, 1.0
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = peak if peak > 0 and math.isfinite(peak) else 1.0
    return (values / scale).astype(np.float16), scale


def decode_tensor(array, scale, *, site: str | None, field_name: str) -> torch.Tensor:
    """Checked inverse of ``encode_tensor``: refuses non-arrays, non-float dtypes, NaN and Inf."""
    if not isinstance(array, np.ndarray):
        raise ProtocolError(f"expected a numpy array, got {type(array).__name__}", site=site, field=field_name)
    if array.dtype not in (np.float16, np.float32):
        raise ProtocolError(f"expected float16 or float32, got {array.dtype}", site=site, field=field_name)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ProtocolError(f"invalid scale {scale!r}", site=site, field=f"{field_name}.scale")
    if not np.isfinite(array).all():
        raise ProtocolError(f"contains {int((~np.isfinite(array)).sum())} NaN/Inf values", site=site,
                            field=field_name)
    return torch.from_numpy(array.astype(np.float32)) * scale


@dataclass
class TensorMessage:
    """Per-level tensors plus the bookkeeping of one exchange (see module docstring)."""

    kind: str
    step: int
    patient_ids: list[str]
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    tensor_step: int | None = None  # for gradients: the step whose activations they belong to
    info: dict = field(default_factory=dict)  # e.g. {"train_step": k, "train_steps": n} on training tasks

    def to_shareable(self, wire_dtype: str) -> tuple[Shareable, int]:
        """-> (shareable, bytes of tensor payload)."""
        data, scales = {}, {}
        for level, tensor in self.tensors.items():
            data[str(level)], scales[str(level)] = encode_tensor(tensor, wire_dtype)
        meta = {"step": self.step, "patient_ids": list(self.patient_ids), "scales": scales,
                "tensor_step": self.tensor_step, "info": dict(self.info)}
        return DXO(data_kind=self.kind, data=data, meta=meta).to_shareable(), sum(a.nbytes for a in data.values())

    @classmethod
    def from_shareable(cls, shareable: Shareable, kind: str, *, site: str | None) -> "TensorMessage":
        dxo = dxo_of(shareable, kind, site=site)
        meta = dxo.meta or {}
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ProtocolError(f"step must be an integer, got {step!r}", site=site, field="step")
        patient_ids = meta.get("patient_ids")
        if not isinstance(patient_ids, list) or not all(isinstance(p, str) for p in patient_ids):
            raise ProtocolError("patient_ids must be a list of strings", site=site, field="patient_ids")
        tensor_step = meta.get("tensor_step")
        if tensor_step is not None and (not isinstance(tensor_step, int) or isinstance(tensor_step, bool)):
            raise ProtocolError(f"tensor_step must be an integer, got {tensor_step!r}", site=site,
                                field="tensor_step")
        info = meta.get("info") or {}
        if not isinstance(info, Mapping):
            raise ProtocolError("info must be a mapping", site=site, field="info")
        scales = meta.get("scales")
        if not isinstance(scales, Mapping):
            raise ProtocolError("scales missing", site=site, field="scales")
        tensors = {}
        for key, array in dxo.data.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise ProtocolError(f"unexpected key {key!r}: levels are non-negative integers", site=site,
                                    field=kind)
            tensors[int(key)] = decode_tensor(array, scales.get(key), site=site, field_name=f"{kind}[{key}]")
        return cls(kind=kind, step=step, patient_ids=patient_ids, tensors=tensors, tensor_step=tensor_step,
                   info=dict(info))


def resolve_steps(steps: Sequence[int], total: int) -> set[int]:
    """Training steps 1..total; negative entries count from the end (-1 = the last step)."""
    return {step if step > 0 else total + 1 + step for step in steps if step != 0}


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


def error_reply(message: str) -> Shareable:
    """A reply that tells the server what went wrong at the site."""
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(ERROR_HEADER, message)
    return reply

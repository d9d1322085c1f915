"""Fuzz test of the wire format: hostile DXO contents into the parsers of both ends.

Each case starts from a valid message and applies one to three mutations, every one of which makes the
message invalid. A seeded generator (no hypothesis in the environment) keeps the cases reproducible:
a failure prints its case number and mutations.
"""

import copy
import random

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from split_unet.errors import ProtocolError
from split_unet.protocol.codecs import CODECS, DTYPES, INDICES_DTYPE, INDICES_SUFFIX
from split_unet.protocol.wire import (ERROR_HEADER, KIND_ACTIVATIONS, KIND_REQUEST, TASK_TRAIN, TensorMessage,
                                      error_reply, read_activations)

CASES = 300
NOT_AN_INT = [None, True, False, "1", 1.5, float("nan"), [], {}, [1]]
BAD_KEYS = ["-1", "a", "\u00b2", "0:foo", "00", "1.5", " 1", "1 ", 7, "0:", "1:indices:indices", "9999999"]
# Values re-encoded in another dtype: a byte count that no longer matches the declared shape (the dtypes of the
# same size as the codec's are left out: their bytes would be valid values of the codec's dtype).
BAD_DTYPES = [np.int64, np.float64, np.bool_, np.complex64, np.float32, np.float16, np.uint8, np.int32]


def _valid(kind: str, step: int, patient_ids: list[str], shapes: dict[int, tuple], codec: str,
           tensor_step: int | None, rng: random.Random) -> Shareable:
    tensors = {level: torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
               for level, shape in shapes.items()}
    # A training request carries its training step, as the server's do: a message is hostile by its mutations only.
    info = {"train_step": step} if kind == KIND_REQUEST else {}
    message = TensorMessage(kind, step, patient_ids, tensors, tensor_step=tensor_step, info=info)
    return message.to_shareable(codec, keep_fraction=0.3)[0]


def _level(raw: dict, rng: random.Random) -> str:
    return rng.choice(sorted(k for k in raw["data"] if _is_level(k)))


def _is_level(key: object) -> bool:
    return isinstance(key, str) and key.isascii() and key.isdigit()


def _dtype(raw: dict, key: str) -> np.dtype:
    """The wire dtype of a data key (its level's codec is intact: tensor mutations come before header ones)."""
    level, _, suffix = key.partition(":")
    return INDICES_DTYPE if suffix else DTYPES[raw["meta"]["encodings"][level]["codec"]]


def _numeric(raw: dict, key: str) -> bool:
    """Still whole values of its codec's dtype that an earlier mutation left in place (later ones edit them)."""
    value = raw["data"].get(key)
    return isinstance(value, bytes) and len(value) > 0 and len(value) % _dtype(raw, key).itemsize == 0


def _values(raw: dict, key: str) -> np.ndarray:
    """A writable copy of a data key's values; store it back with ``raw["data"][key] = values.tobytes()``."""
    return np.frombuffer(raw["data"][key], _dtype(raw, key)).copy()


def _mutate_meta(raw: dict, rng: random.Random, valid_step: int) -> str:
    meta = raw["meta"]
    choice = rng.choice(["step", "patient_ids", "delete", "info", "encodings"])
    if choice == "step":
        meta["step"] = rng.choice(NOT_AN_INT + [-7, valid_step - 1, 2**70])
    elif choice == "patient_ids":
        meta["patient_ids"] = rng.choice([["BRATS_999"], "BRATS_001", [1], None, [None], ["BRATS_001", 3]])
    elif choice == "delete":
        meta.pop(rng.choice(["step", "patient_ids", "encodings"]), None)
    elif choice == "info":
        meta["info"] = rng.choice([[1], "x", 3])
    else:
        meta["encodings"] = rng.choice([[1], "float32", 5, None])
    return choice


def _mutate_header(raw: dict, rng: random.Random) -> str:
    level = _level(raw, rng)
    header = raw["meta"]["encodings"].setdefault(level, {"codec": "float32", "shape": [1], "scale": 1.0})
    choice = rng.choice(["codec", "shape", "huge", "scale", "overflow", "missing"])
    if choice == "overflow" and not _numeric(raw, level):
        choice = "codec"
    if choice == "codec":
        header["codec"] = rng.choice(["bf8", None, 3, ["float32"], "FLOAT32"])
    elif choice == "shape":
        shape = header["shape"] if isinstance(header["shape"], list) else [3, 3]
        header["shape"] = rng.choice([[-1] + shape[1:], [1.5], "abc", None, shape + [2], shape[:-1]])
    elif choice == "huge":
        header["shape"] = rng.choice([[2**40], [2**20, 2**20, 2**20], [1, 2**62]])
    elif choice == "scale":
        bad = rng.choice([float("nan"), float("inf"), -1.0, 0.0, "1", None, 10**400, True, {}])
        header["scale"] = [bad] * len(header["scale"]) if isinstance(header["scale"], list) else bad
    elif choice == "overflow":  # finite values, finite scale, but their product overflows float32
        header["scale"] = [1e38] * len(header["scale"]) if isinstance(header["scale"], list) else 1e38
        values = _values(raw, level)
        values[0] = 100
        raw["data"][level] = values.tobytes()
    else:
        del raw["meta"]["encodings"][level]
    return f"{choice}[{level}]"


def _mutate_data(raw: dict, rng: random.Random) -> str:
    data, level = raw["data"], _level(raw, rng)
    codec = raw["meta"]["encodings"].get(level, {}).get("codec")
    choice = rng.choice(["key", "not_array", "dtype", "nonfinite", "array_shape", "drop", "extra", "indices"])
    if choice == "nonfinite" and codec == "int8":
        choice = "dtype"  # int8 cannot hold NaN
    if choice == "indices" and (codec != "topk" or not _numeric(raw, f"{level}{INDICES_SUFFIX}")):
        choice = "array_shape"
    if choice in ("dtype", "nonfinite", "array_shape") and not _numeric(raw, level):
        choice = "key"
    if choice == "key":
        data[rng.choice(BAD_KEYS)] = data[level]
    elif choice == "not_array":
        data[level] = rng.choice([[[0.0]], "x", None, 3.0, torch.zeros(2), {"a": 1}, np.zeros(2, np.float16)])
    elif choice == "dtype":
        itemsize = _dtype(raw, level).itemsize
        with np.errstate(invalid="ignore", over="ignore"):  # NaN cast to an integer type
            data[level] = _values(raw, level).astype(
                rng.choice([d for d in BAD_DTYPES if np.dtype(d).itemsize != itemsize])).tobytes()
    elif choice == "nonfinite":
        values = _values(raw, level)
        values[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf])
        data[level] = values.tobytes()
    elif choice == "array_shape":
        values = _values(raw, level)
        data[level] = (values[: values.size // 2] if values.size > 1 else np.concatenate([values] * 2)).tobytes()
    elif choice == "drop":
        for key in [k for k in data if isinstance(k, str) and k.split(":")[0] == level]:
            del data[key]
    elif choice == "extra":
        data["7"] = data[level]
        raw["meta"]["encodings"]["7"] = copy.deepcopy(raw["meta"]["encodings"].get(level))
        if f"{level}{INDICES_SUFFIX}" in data:
            data[f"7{INDICES_SUFFIX}"] = data[f"{level}{INDICES_SUFFIX}"]
    else:
        key = f"{level}{INDICES_SUFFIX}"
        indices = _values(raw, key)
        numel = int(np.prod(raw["meta"]["encodings"][level]["shape"]))  # intact: topk checked above
        data[key] = rng.choice([(indices + numel).tobytes(), (indices - numel).tobytes(),
                                indices.astype(np.int64).tobytes(), indices[:-1].tobytes(), data[key] + b"\0"])
    return f"{choice}[{level}]"


def _mutate_payload(shareable: Shareable, rng: random.Random, kind: str) -> tuple[object, str]:
    choice = rng.choice(["not_shareable", "no_dxo", "kind", "error", "data", "content"])
    if choice == "not_shareable":
        return rng.choice([None, {}, b"", "DXO", 3]), choice
    if choice == "no_dxo":
        return Shareable(), choice
    if choice == "kind":
        shareable["DXO"]["kind"] = rng.choice([KIND_ACTIVATIONS if kind == KIND_REQUEST else KIND_REQUEST,
                                               None, 5, ""])
    elif choice == "error":
        return error_reply(rng.choice(["disk full", "", "x" * 10000])), choice
    elif choice == "data":
        shareable["DXO"]["data"] = rng.choice([[1, 2], "data", 7])
    else:
        shareable["DXO"] = rng.choice(["junk", [1], 0])
    return shareable, choice


def hostile_messages(kind: str, step: int, patient_ids: list[str], shapes: dict[int, tuple],
                     tensor_step: int | None, seed: int):
    """Yield (case, mutation names, payload): valid messages made invalid by one to three mutations."""
    rng = random.Random(seed)
    for case in range(CASES):
        shareable = _valid(kind, step, patient_ids, shapes, rng.choice(CODECS), tensor_step, rng)
        raw, names = shareable["DXO"], []
        # Tensor mutations first: they need the meta fields a meta mutation may remove.
        for group in sorted(rng.choice(["data", "header", "meta"]) for _ in range(rng.randint(1, 3))):
            if group == "meta" or not any(_is_level(k) for k in raw["data"]):
                names.append("meta:" + _mutate_meta(raw, rng, step))
            elif group == "header":
                names.append("header:" + _mutate_header(raw, rng))
            else:
                names.append("data:" + _mutate_data(raw, rng))
        payload = shareable
        if rng.random() < 0.1:
            payload, name = _mutate_payload(shareable, rng, kind)
            names.append("payload:" + name)
        yield case, names, payload


def test_parser_raises_only_protocol_errors():
    """Any message, any codec: ``from_shareable`` returns or raises ProtocolError naming the site."""
    shapes = {0: (1, 4, 8, 8, 8), 1: (1, 8, 4, 4, 4)}
    for case, names, payload in hostile_messages(KIND_ACTIVATIONS, 5, ["P1"], shapes, None, seed=1):
        try:
            TensorMessage.from_shareable(payload, KIND_ACTIVATIONS, site="t2w")
        except ProtocolError as error:
            assert "site 't2w'" in str(error) and error.field, (case, names)
        except Exception as error:  # noqa: BLE001  the point of the test
            pytest.fail(f"case {case} {names}: {type(error).__name__}: {error}")


def test_server_refuses_every_hostile_answer():
    """The controller's checks of an answer (``read_activations``) refuse each case with a ProtocolError."""
    shapes = {0: (2, 4, 8, 8, 8), 1: (2, 8, 4, 4, 4), 2: (2, 16, 2, 2, 2)}
    for case, names, payload in hostile_messages(KIND_ACTIVATIONS, 5, ["P1", "P2"], shapes, None, seed=2):
        with pytest.raises(ProtocolError, match="site 't1w'"):
            read_activations(payload, site="t1w", step=5, patient_ids=["P1", "P2"], expected=shapes)
            pytest.fail(f"case {case} {names} was accepted")


def test_site_refuses_every_hostile_gradient_and_keeps_its_encoder(site):  # noqa: F811
    """The executor answers each case with an error reply naming the site and the field, never raises, and
    neither its encoder nor its step bookkeeping changes; afterwards a valid gradient still works."""
    executor, fl_ctx = site
    first = TensorMessage(KIND_REQUEST, 1, ["BRATS_001"], info={"train_step": 1})
    reply = executor.execute(TASK_TRAIN, first.to_shareable("float32")[0], fl_ctx, Signal())
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    shapes = {level: tuple(t.shape) for level, t in features.items()}
    before = copy.deepcopy(executor.party.encoder.state_dict())
    for case, names, payload in hostile_messages(KIND_REQUEST, 2, ["BRATS_002"], shapes, 1, seed=3):
        reply = executor.execute(TASK_TRAIN, payload, fl_ctx, Signal())
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION, (case, names)
        message = reply.get_header(ERROR_HEADER)
        assert "site 'flair'" in message and "field '" in message, (case, names, message)
        assert (executor.last_step, executor.pending_step) == (1, 1), (case, names)
    after = executor.party.encoder.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)

    gradients = {level: torch.zeros(shape) for level, shape in shapes.items()}
    valid = TensorMessage(KIND_REQUEST, 2, ["BRATS_002"], gradients, tensor_step=1,
                          info={"train_step": 2}).to_shareable("float32")[0]
    assert executor.execute(TASK_TRAIN, valid, fl_ctx, Signal()).get_return_code(ReturnCode.OK) == ReturnCode.OK


def test_declared_shape_beyond_the_limit_is_refused_before_decoding():
    indices = np.array([0], np.int32)
    payload = DXO(KIND_REQUEST, data={"0": np.ones(1, np.float16).tobytes(), "0:indices": indices.tobytes()},
                  meta={"step": 1, "patient_ids": [], "encodings": {"0": {"codec": "topk", "shape": [2**30],
                                                                          "scale": 1.0}}}).to_shareable()
    with pytest.raises(ProtocolError, match=r"field 'split_unet.gradients\[0\].shape'.*more than the limit"):
        TensorMessage.from_shareable(payload, KIND_REQUEST, site="flair")
    with pytest.raises(ProtocolError, match="more than the limit of 100"):
        TensorMessage.from_shareable(payload, KIND_REQUEST, site="flair", max_elements=100)

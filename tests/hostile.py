"""What the tests of hostile jobs and data share: a site's workspace and init task, a top-k message header."""

import json
from pathlib import Path

import numpy as np
from helpers import TINY_NETWORK, TINY_SIZE, party_context
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from split_unet.protocol.executor import ModalitySiteExecutor
from split_unet.protocol.settings import SETTINGS_FILE
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_INIT, TASK_INIT
from split_unet.training import TrainConfig

MB = 2**20

TRAIN = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK)


def site_workspace(root: Path, sites: Path, **settings) -> FLContext:
    (root / "local").mkdir(parents=True, exist_ok=True)
    (root / "local" / SETTINGS_FILE).write_text(json.dumps({"modality": "flair", "data_dir": str(sites / "flair"),
                                                             **settings}))
    return party_context(root)


def init_task(executor: ModalitySiteExecutor, fl_ctx: FLContext, **extra):
    request = DXO(KIND_INIT, data={"train": TRAIN.to_dict(), "site_index": 0, "wire_dtype": "float32", **extra})
    return executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())


def topk_message(shape: list[int]):
    """A tiny top-k gradient message whose header declares ``shape``."""
    return DXO(KIND_ACTIVATIONS,
               data={"0": np.ones(1, np.float16).tobytes(), "0:indices": np.zeros(1, np.int32).tobytes()},
               meta={"step": 1, "patient_ids": ["BRATS_001"], "info": {"train_step": 1, "train_steps": 1},
                     "encodings": {"0": {"codec": "topk", "shape": shape, "scale": 1.0}}}).to_shareable()


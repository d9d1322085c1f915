"""Leakage evaluation: what the exchanged activations and gradients give away (plain PyTorch).

Submodules: ``record`` (what the curious server keeps), ``attacks``, ``metrics`` and ``figures``; the study that
runs them on a recorded run is ``split_unet.studies.leakage`` (``split-unet leakage``). Only the record format is re-exported here, so that the NVFlare
site and server processes, which import it, do not load scikit-image and matplotlib.
"""

from .record import RECORD_FOLDER, SNAPSHOT_FOLDER, RecordedExchange, load_record, snapshot_path, step_folder

__all__ = ["RECORD_FOLDER", "SNAPSHOT_FOLDER", "RecordedExchange", "load_record", "snapshot_path", "step_folder"]

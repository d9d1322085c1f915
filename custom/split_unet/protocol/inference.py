"""Split inference: the server's Controller for segmenting patients whose modalities lie at the sites.

The trained encoders stay at their sites (``ModalitySiteExecutor(encoder_path=...)``) and the trained
decoder at the server. Each round sends a batch of patient ids; every site answers with its encoder's
features and, as header data only, the affine and shape of its source volumes; the server decodes, nests the
regions (ET inside TC inside WT), writes each segmentation as NIfTI in that source geometry with the label values
of the data's own release (the convention the server's datalist names, also where it holds no label, as for a
validation release), and scores the file it wrote, in source space, against the source label where it holds one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from split_unet.data import (CONVENTIONS, DATALIST, MODALITIES, label_from_regions, label_to_source,
                             read_label, regions, write_nifti)
from split_unet.errors import ProtocolError
from split_unet.files import write_json
from split_unet.ids import check_patient_ids
from split_unet.training import RegionMetrics, chunks, logits_to_masks

from .checkpoint import load_checkpoint
from .names import SEGMENTATIONS
from .paths import inside
from .wire import TASK_INFER
from .rounds import INIT_TIMEOUT
from .workflow import SplitWorkflow

RESULT_FILE = "inference.json"


class SplitInferenceController(SplitWorkflow):
    """Inference workflow of the Split-U-Net (arguments of ``SplitWorkflow``, plus):

    Args:
        decoder_path: the trained decoder (the training job's ``PTFileModelPersistor`` file), relative to the
            server's workspace (absolute paths and '..' are refused).
        patients: patient ids to segment; default every patient that all sites hold.
        output_folder: folder in the server's run folder for ``<patient>.nii.gz`` and ``inference.json``.
    """

    def __init__(self, decoder_path: str, patients: Sequence[str] = (), output_folder: str = SEGMENTATIONS,
                 sites: Sequence[str] = MODALITIES, train: dict | None = None, wire_dtype: str = "float32",
                 task_timeout: int = 600, on_site_failure: str = "stop", summary_file: str = "summary.json",
                 num_threads: int = 0, task_check_period: float = 0.01, init_timeout: int = INIT_TIMEOUT,
                 transport: str = "poll"):
        super().__init__(sites, train, wire_dtype, task_timeout, on_site_failure, summary_file, num_threads,
                         task_check_period, init_timeout, transport)
        self.decoder_path = decoder_path
        # Each becomes a file name "<id>.nii.gz": the id rule keeps it in the output folder.
        self.patients = check_patient_ids(patients, site="server", field="patients", error=ProtocolError)
        self.output_folder = output_folder

    def run_workflow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        start = time.perf_counter()
        common = self.setup(abort_signal, fl_ctx, labels_required=False)
        patient_ids = self.patients or common
        if unknown := sorted(set(patient_ids) - set(common)):
            raise ProtocolError(f"{len(unknown)} requested patients are not held by every site, e.g. {unknown[0]}",
                                site="server", field="patients")
        if self.labels is None:
            raise ProtocolError(f"no {DATALIST} in the server's data folder: it names the label convention the "
                                "segmentations are written with (split-unet partition writes it, also where no case "
                                "is labelled)", site="server", field=DATALIST)
        out = inside(self.run_dir, self.output_folder, site="server", field="output_folder", where="run folder")
        out.mkdir(parents=True, exist_ok=True)
        convention = self.labels.convention
        results, scored = {}, RegionMetrics()
        for batch_ids in chunks(patient_ids, self.config.val_batch_size):
            logits = self.segment(TASK_INFER, batch_ids, abort_signal, fl_ctx)
            masks = logits_to_masks(logits, min_component_voxels=self.config.min_component_voxels)
            for pid, mask in zip(batch_ids, masks):
                shape, affine = self.grids[pid]
                label = label_to_source(label_from_regions(mask.numpy(), convention), affine, shape,
                                        self.config.spacing)
                write_nifti(label, affine, out / f"{pid}.nii.gz")
                results[pid] = {"segmentation": f"{pid}.nii.gz"}
                if self.labels is not None and pid in self.labels.patient_ids:
                    # The file as written against the source label, both in source space (voxel sizes in mm).
                    truth, _ = read_label(self.labels.path(pid), convention, site="server", patient=pid,
                                          grid_size=self.config.grid_shape)
                    if truth.shape != label.shape:
                        raise ProtocolError(f"label shape {truth.shape} differs from the sites' {shape}", site="server",
                                            patient=pid, field=str(self.labels.path(pid)))
                    (case,) = scored.update(torch.from_numpy(regions(label, convention))[None],
                                            torch.from_numpy(regions(truth, convention))[None],
                                            [nib.affines.voxel_sizes(affine)])
                    results[pid].update(case)
            self.log_info(fl_ctx, f"segmented {len(results)}/{len(patient_ids)} patients")
        oedema, core, enhancing = CONVENTIONS[convention]
        summary = {"patients": results, "segmentations": str(out), "convention": convention,
                   "label_values": {"oedema": oedema, "non_enhancing": core, "enhancing": enhancing},
                   "scored_in": "source space (the files written)", "hd95_unit": "mm",
                   "wall_seconds": round(time.perf_counter() - start, 2)}
        if any("dice" in r for r in results.values()):
            aggregate = scored.aggregate()
            summary.update({key: aggregate[key] for key in ("dice", "hd95", "lesion_dice", "lesion_hd95", "lesions")},
                           scored_cases=aggregate["cases"])
            self.log_info(fl_ctx, "Dice " + " ".join(f"{k} {v:.3f}" for k, v in aggregate["dice"].items()))
        write_json(out / RESULT_FILE, summary)
        self.log_info(fl_ctx, f"segmentations written to {out}")

    def load_decoder(self, decoder: torch.nn.Module, fl_ctx: FLContext) -> None:
        root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        path = inside(root, self.decoder_path, site="server", field="decoder_path")
        if not path.is_file():
            raise ProtocolError(f"trained decoder not found at {path}", site="server", field="decoder_path")
        weights = load_checkpoint(path, site="server", field="decoder_path")["model"]
        decoder.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        self.log_info(fl_ctx, f"decoder loaded from {path}")

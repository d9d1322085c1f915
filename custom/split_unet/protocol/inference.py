"""Split inference: the server's Controller for segmenting patients whose modalities lie at the sites.

The trained encoders stay at their sites (``ModalitySiteExecutor(encoder_path=...)``) and the trained
decoder at the server. Each round sends a batch of patient ids; every site answers with its encoder's
features and, as header data only, the affine and shape of its source volumes; the server decodes, nests the
regions (ET inside TC inside WT), writes each segmentation as NIfTI in that source geometry with the label values
of the data's own release (the convention the server's datalist names, also where it holds no label, as for a
validation release), and scores the file it wrote, in source space, against the source label where it holds one.

Post-processing (the smallest connected component kept per region) is the training's ``min_component_voxels``
unless the job chooses it (``choose_postprocessing``): then the patients segmented are labelled training patients,
the server picks the sizes on its grid from their logits and labels
(``training.postprocess.choose_min_component_voxels``), writes their files with those sizes and reports them for
the inference of every other patient.
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
from split_unet.training.postprocess import choose_min_component_voxels

from .checkpoint import load_checkpoint
from .names import SEGMENTATIONS
from .paths import inside
from .wire import TASK_INFER
from .rounds import INIT_TIMEOUT
from .workflow import SplitWorkflow

RESULT_FILE = "inference.json"


def check_labelled(patient_ids: Sequence[str], labelled: Sequence[str]) -> None:
    """The patients a post-processing is chosen on: every one labelled at the server, else a ProtocolError."""
    if unlabelled := sorted(set(patient_ids) - set(labelled)):
        raise ProtocolError(f"the post-processing is chosen on labelled patients; {len(unlabelled)} of the "
                            f"{len(patient_ids)} have no label at the server, e.g. {unlabelled[0]}", site="server",
                            field="patients")


class SplitInferenceController(SplitWorkflow):
    """Inference workflow of the Split-U-Net (arguments of ``SplitWorkflow``, plus):

    Args:
        decoder_path: the trained decoder (the training job's ``PTFileModelPersistor`` file), relative to the
            server's workspace (absolute paths and '..' are refused).
        patients: patient ids to segment; default every patient that all sites hold.
        output_folder: folder in the server's run folder for ``<patient>.nii.gz`` and ``inference.json``.
        choose_postprocessing: choose ``min_component_voxels`` on these patients (each must have a label at the
            server: training patients, never those the model is scored on) instead of the training's; every
            patient's logits are held until the choice (about 100 MB per patient at 240 x 240 x 155).
    """

    def __init__(self, decoder_path: str, patients: Sequence[str] = (), output_folder: str = SEGMENTATIONS,
                 sites: Sequence[str] = MODALITIES, train: dict | None = None, wire_dtype: str = "float32",
                 task_timeout: int = 600, on_site_failure: str = "stop", summary_file: str = "summary.json",
                 num_threads: int = 0, task_check_period: float = 0.01, init_timeout: int = INIT_TIMEOUT,
                 transport: str = "poll", choose_postprocessing: bool = False):
        super().__init__(sites, train, wire_dtype, task_timeout, on_site_failure, summary_file, num_threads,
                         task_check_period, init_timeout, transport)
        self.decoder_path = decoder_path
        # Each becomes a file name "<id>.nii.gz": the id rule keeps it in the output folder.
        self.patients = check_patient_ids(patients, site="server", field="patients", error=ProtocolError)
        self.output_folder = output_folder
        self.choose_postprocessing = bool(choose_postprocessing)

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
        if self.choose_postprocessing:
            check_labelled(patient_ids, self.labels.patient_ids)
        out = inside(self.run_dir, self.output_folder, site="server", field="output_folder", where="run folder")
        out.mkdir(parents=True, exist_ok=True)
        convention = self.labels.convention
        results, scored = {}, RegionMetrics()
        batches = ((ids, self.segment(TASK_INFER, ids, abort_signal, fl_ctx))
                   for ids in chunks(patient_ids, self.config.val_batch_size))
        postprocessing: dict = {"min_component_voxels": self.config.min_component_voxels}
        if self.choose_postprocessing:
            batches = list(batches)  # every patient's logits first: the sizes chosen apply to all of them
            sizes, scores = choose_min_component_voxels(
                [logits[k:k + 1] for _, logits in batches for k in range(len(logits))],
                [torch.from_numpy(self.labels.get(pid))[None] for ids, _ in batches for pid in ids],
                [self.labels.grid_spacing(pid) for ids, _ in batches for pid in ids])
            postprocessing = {"min_component_voxels": sizes, "chosen_on": list(patient_ids), "scores": scores}
            self.log_info(fl_ctx, f"post-processing chosen on {len(patient_ids)} patients: smallest component "
                                  f"kept (WT, TC, ET) {sizes} voxels")
        for batch_ids, logits in batches:
            masks = logits_to_masks(logits, min_component_voxels=postprocessing["min_component_voxels"])
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
                   "scored_in": "source space (the files written)", "hd95_unit": "mm", "postprocessing": postprocessing,
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

"""Patient alignment with NVFlare's Diffie-Hellman PSI, the label holder included.

NVFlare's ``DhPSIController`` intersects the clients' items only. Here the four modality sites first run
it unchanged on their patient ids; then the label holder (the server) takes part as one more DH party:
with its own label ids it answers every site's PSI request, so each site learns which of the shared
patients also have labels, while the server learns only set sizes. Every site ends with the intersection of
all five parties in ``<site workspace>/<PSI job id>/<site>/psi/intersection.txt`` (``FilePSIWriter``), which
the training job reads (``ModalitySiteExecutor(psi_job_id=...)``).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.psi.dh_psi.dh_psi_controller import DhPSIController
from nvflare.app_common.psi.dh_psi.dh_psi_workflow import DhPSIWorkFlow
from nvflare.app_common.psi.psi_spec import PSI
from nvflare.app_common.psi.psi_workflow_spec import PSIWorkflow
from nvflare.app_opt.psi.dh_psi.dh_psi_server import PSIServer

from split_unet.data import SERVER_SITE, SiteImages, SiteLabels
from split_unet.errors import DataError, ProtocolError
from split_unet.ids import check_patient_ids

from .paths import inside
from .settings import load_site_settings

#: ``FilePSIWriter``'s ``output_path`` in ``jobs/split_unet_psi`` (relative to ``<run folder>/<site>/``).
PSI_OUTPUT = "psi/intersection.txt"


def intersection_path(workspace_root: str | Path, psi_job_id: str, site: str) -> Path:
    """Where ``FilePSIWriter`` leaves a site's intersection: ``<root>/<job id>/<site>/psi/intersection.txt``;
    the job id a job names is one folder of the site's workspace."""
    if not isinstance(psi_job_id, str) or "/" in psi_job_id:
        raise ProtocolError(f"a PSI job id is one folder name, got {psi_job_id!r}", site=site, field="psi_job_id")
    return inside(workspace_root, f"{psi_job_id}/{site}/{PSI_OUTPUT}", site=site, field="psi_job_id")


def read_intersection(workspace_root: str | Path, psi_job_id: str, site: str) -> list[str]:
    path = intersection_path(workspace_root, psi_job_id, site)
    if not path.is_file():
        raise DataError(f"no PSI result of job '{psi_job_id}' (run jobs/split_unet_psi first)", site=site,
                        field=str(path))
    return check_patient_ids([line for line in path.read_text().splitlines() if line], site=site, field=str(path))


class SitePatients(PSI):
    """A modality site's PSI items: the patient ids of its datalist (the volumes are not read)."""

    def load_items(self) -> list[str]:
        site = self.fl_ctx.get_identity_name()
        settings = load_site_settings(site, self.fl_ctx.get_engine().get_workspace().get_root_dir())
        return SiteImages(settings["data_dir"], size=0, site=site).patient_ids  # size unused: no volume is loaded


class LabelHolderPSIWorkflow(DhPSIWorkFlow):
    """DH PSI across the sites, then one more pass with the label holder's ids (see the module docstring)."""

    def __init__(self, label_ids: list[str], bloom_filter_fpr: float = 1e-11):
        super().__init__(bloom_filter_fpr)
        self.label_ids = label_ids

    def post_process(self, abort_signal: Signal) -> None:
        if abort_signal.triggered:
            return
        self.abort_signal = abort_signal
        # After NVFlare's backward pass every site holds the sites' intersection, all of one size.
        site_size = next(iter(self.backward_processed.values()), self.ordered_sites[0].size)
        server = PSIServer(self.label_ids, self.bloom_filter_fpr)
        setup = server.setup(site_size)
        # The sites' own task handler answers as in NVFlare's backward pass: a request from their items...
        requests = self.create_requests({site.name: setup for site in self.ordered_sites})
        # ...the label holder's response, from which each site computes (and saves) the final intersection.
        sizes = self.calculate_intersections({name: server.process_request(msg) for name, msg in requests.items()})
        if len(set(sizes.values())) != 1:
            raise RuntimeError(f"sites disagree on the intersection with the label holder: {sizes}")
        self.log_info(self.fl_ctx, f"{next(iter(sizes.values()))} patients held by every site and the label "
                                   f"holder ({len(self.label_ids)} labelled, {site_size} shared by the sites)")


class LabelHolderPSIController(DhPSIController):
    """``DhPSIController`` whose workflow includes the server's labelled patients."""

    def load_psi_workflow(self, fl_ctx: FLContext) -> PSIWorkflow:
        settings = load_site_settings(SERVER_SITE, fl_ctx.get_engine().get_workspace().get_root_dir())
        labels = SiteLabels(settings["data_dir"], size=0, site=SERVER_SITE)  # size unused: no volume is loaded
        workflow = LabelHolderPSIWorkflow(labels.patient_ids)
        workflow.initialize(fl_ctx, controller=self)
        return workflow

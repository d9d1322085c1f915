"""The server's side of the exchange with the sites: one round trip at a time, every message checked.

``SiteRounds`` sends every site its own task at once (the gradient of its previous activations and the next
request), waits for all of them, checks each answer (step, patients, levels and shapes, what the site reports about
itself and its privacy budget) and applies the job's policy to a site that does not answer. The training and the
inference controllers compose it; neither repeats any of it.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from split_unet.accounting import gaussian_epsilon
from split_unet.data import MODALITIES, is_scanner_affine
from split_unet.data.readers import Grid, grid_mismatch, odd_grids
from split_unet.errors import ProtocolError
from split_unet.ids import check_patient_ids, is_integer, is_number
from split_unet.training import TrainConfig, present_inputs

from .codecs import CODECS, check_compression
from .transport import make_transport
from .wire import (KIND_INIT, KIND_REQUEST, KIND_SITE_INFO, TASK_INIT, TASK_TRAIN, TensorMessage, dxo_of,
                   read_activations)

Features = dict[int, torch.Tensor]

# Bounds on what a site reports about its own process: beyond them a number is not a measurement
# (1e9 CPU seconds are 31 years, 1e9 MB a petabyte).
REPORT_BOUNDS = {"cpu_seconds": 1e9, "busy_seconds": 1e9, "peak_memory_mb": 1e9, "gpu_peak_mb": 1e9,
                 "parent_cpu_seconds": 1e9, "parent_pid": 2**31}
# The server recomputes a site's epsilon with the site filter's own function and compares: the same code gives
# the same float; the tolerance only leaves room for another machine's floating-point library.
EPSILON_RELATIVE_TOLERANCE = 1e-6
MAX_RELEASES = 10**9

# The first task: a site opens and checks every volume it holds (minutes for a large native data set).
INIT_TIMEOUT = 1800
MAX_SOURCE_DIM = 2048  # voxels along one axis of a source volume whose geometry a site reports


def _is_number(value: object) -> bool:
    return is_number(value) and math.isfinite(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}... ({type(value).__name__} of {len(text)} characters)"


def check_site_report(info: Mapping, site: str) -> dict:
    """What the server keeps of the ``info`` a site sends about its own process: CPU seconds and peak memory,
    each a finite number within ``REPORT_BOUNDS``."""
    report = {}
    for key, bound in REPORT_BOUNDS.items():
        if key in info:
            if not _is_number(info[key]) or not 0 <= info[key] <= bound:
                raise ProtocolError(f"must be a number in [0, {bound:g}], got {_shown(info[key])}", site=site,
                                    field=f"info.{key}")
            report[key] = float(info[key])
    return report


def check_empty_windows(info: Mapping, site: str, windows: int) -> list[bool] | None:
    """A site's ``empty_windows`` (which of the ``windows`` it encoded hold no image there): one bool per window, or
    None where the site says nothing (its privacy filter drops it)."""
    flags = info.get("empty_windows")
    if flags is None:
        return None
    if not isinstance(flags, list) or len(flags) != windows or not all(isinstance(flag, bool) for flag in flags):
        raise ProtocolError(f"must be a list of {windows} booleans, got {_shown(flags)}", site=site,
                            field="info.empty_windows")
    return flags


def check_privacy_report(info: Mapping, site: str, releases_seen: int) -> dict:
    """A site's differential-privacy report (``ActivationClipNoise``): the server recomputes the epsilon from
    the mechanism's declared parameters and refuses a report that differs or that claims fewer releases per
    patient than the server itself received. The server cannot see the noise; it checks the arithmetic."""
    noise, delta, releases, epsilon = (info.get(key) for key in ("dp_noise_multiplier", "dp_delta", "dp_releases",
                                                                  "dp_epsilon"))
    if not _is_number(noise) or noise < 0:
        raise ProtocolError(f"must be a finite number >= 0, got {_shown(noise)}", site=site,
                            field="info.dp_noise_multiplier")
    if not _is_number(delta) or not 0 < delta < 1:
        raise ProtocolError(f"must be a number in (0, 1), got {_shown(delta)}", site=site, field="info.dp_delta")
    if not is_integer(releases) or not releases_seen <= releases <= MAX_RELEASES:
        raise ProtocolError(f"must be an integer of at least {releases_seen} (the releases per patient the server "
                            f"received), got {_shown(releases)}", site=site, field="info.dp_releases")
    computed = gaussian_epsilon(noise, releases, delta)
    if not is_number(epsilon) or not (
            epsilon == computed or math.isclose(epsilon, computed, rel_tol=EPSILON_RELATIVE_TOLERANCE)):
        raise ProtocolError(f"reported epsilon {_shown(epsilon)} is not the {computed:.6g} of the declared mechanism "
                            f"(noise multiplier {noise}, {releases} releases, delta {delta})", site=site,
                            field="info.dp_epsilon")
    return {"epsilon": computed, "delta": delta, "noise_multiplier": noise, "releases_per_patient": releases}


def reported_grid(entry: object, site: str, patient_id: str) -> Grid:
    """A source grid a site reports for a patient, ``(shape, affine)``: three dimensions, each 1 to
    ``MAX_SOURCE_DIM`` (a segmentation of that shape is allocated from it), and a finite, invertible 4x4 affine."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or len(shape) != 3 or not all(
            is_integer(n) and 1 <= n <= MAX_SOURCE_DIM for n in shape):
        raise ProtocolError(f"shape must be three integers in [1, {MAX_SOURCE_DIM}], got {str(shape)[:60]}",
                            site=site, patient=patient_id, field="info.geometry.shape")
    try:
        affine = np.asarray(entry.get("affine"), dtype=np.float64)
    except (TypeError, ValueError):
        affine = np.zeros(0)
    if not is_scanner_affine(affine):
        raise ProtocolError("affine must be a finite, invertible 4x4 matrix", site=site, patient=patient_id,
                            field="info.geometry.affine")
    return tuple(shape), affine


def check_one_grid(grids: Mapping[str, Grid], patient_id: str, files: Mapping[str, str] | None = None) -> Grid:
    """One patient's grid, which every party's volume must share (as ``split-unet check`` compares them); a party
    (key of ``grids``) whose grid differs from the one most share is named, with its file where ``files`` says."""
    reference, odd = odd_grids(grids)
    if odd:
        where = f" ({files[odd[0]]})" if files and odd[0] in files else ""
        raise ProtocolError(grid_mismatch(grids[odd[0]], grids[reference], f"site '{reference}'") + where, site=odd[0],
                            patient=patient_id, field="info.geometry")
    return grids[reference]


def protected_levels(info: Mapping, received: Sequence[int], site: str) -> int:
    """How many of the ``received`` levels the site's noise filter says it protected (``dp_levels``)."""
    levels = _levels(info, "dp_levels", site)
    return len(received) if levels is None else len(set(received) & set(levels))


def activation_shapes(config: TrainConfig, batch: int, spatial: Sequence[int] | None = None
                      ) -> dict[int, tuple[int, ...]]:
    """``{level: (batch, C_l, *S_l)}`` of the activations a site sends (and the gradients it gets back) for inputs
    of ``spatial`` shape (default: the training input, a patch or the whole grid)."""
    net = config.network
    shapes, spatial = {}, list(spatial or config.input_shape)
    for level, channels in enumerate(net.sent_channels):
        if level > 0:
            spatial = [side // net.strides[level - 1] for side in spatial]
        if level in net.sent_levels:
            shapes[level] = (batch, channels, *spatial)
    return shapes


def largest_training_tensor(config: TrainConfig) -> int:
    """Elements of the largest tensor of a training step: the bound on anything decoded off a training message."""
    return max(math.prod(shape) for shape in activation_shapes(config, config.batch_size).values())


def refuse_blocked_levels(site: str, blocked: Sequence[int], sent: Sequence[int]) -> None:
    """A site's privacy policy may forbid levels (``LevelBlocking``): refuse the job now, not mid-training."""
    if forbidden := sorted(set(blocked) & set(sent)):
        raise ProtocolError(f"the site's policy blocks levels {forbidden}, but the job's network sends levels "
                            f"{list(sent)}; set train.network.levels without {forbidden}", site=site,
                            field="network.levels")


def _levels(info: Mapping, key: str, site: str) -> list[int] | None:
    """A list of U-Net levels a site reports (``blocked_levels``, ``dp_levels``), or None when it reports none."""
    levels = info.get(key)
    if levels is not None and (not isinstance(levels, list)
                               or not all(is_integer(n) for n in levels)):
        raise ProtocolError(f"must be a list of levels, got {_shown(levels)}", site=site, field=f"info.{key}")
    return levels


class SiteRounds:
    """Round trips between the server and its sites (see the module docstring).

    Args:
        controller: the NVFlare Controller whose tasks carry the messages (and whose log names lost sites).
        sites: client names in encoder order.
        config: the run's settings (the network's sent levels bound what a site may answer).
        wire_dtype: codec of the tensors the server sends (``codecs.CODECS``).
        task_timeout: seconds a site may take to answer one task before it counts as lost.
        on_site_failure: "stop" (a lost site ends the job) or "continue" (the rounds go on without it).
        init_timeout: seconds a site may take to answer the init task (it checks all its data then) and, with a
            privacy warm-up, the first request (the site warms up then).
        transport: "poll" (NVFlare's task route) or "push" (``transport.PushedTasks``).
    """

    def __init__(self, controller: Controller, sites: Sequence[str], config: TrainConfig, wire_dtype: str,
                 task_timeout: int, on_site_failure: str, init_timeout: int, transport: str = "poll"):
        if wire_dtype not in CODECS:
            raise ValueError(f"wire_dtype must be one of {CODECS}, got {wire_dtype!r}")
        check_compression(config.activation_compression, "activation_compression")
        if on_site_failure not in ("stop", "continue"):
            raise ValueError(f"on_site_failure must be 'stop' or 'continue', got {on_site_failure!r}")
        self.controller = controller
        self.sites = list(sites)
        self.transport = make_transport(transport, controller)
        self.config = config
        self.wire_dtype = wire_dtype
        self.task_timeout = int(task_timeout)
        self.init_timeout = int(init_timeout)
        self.on_site_failure = on_site_failure
        self.step = 0  # rounds of any task
        self.rounds_of: Counter[str] = Counter()  # rounds per task name
        self.train_step = 0  # the training step in progress (for the record of a lost site)
        self.lost: dict[str, dict] = {}  # sites lost during the run (policy "continue"): when and why
        self.reply_info: dict[str, dict] = {}  # each site's checked report of its last answer
        self.privacy: dict[str, dict] = {}  # each site's recomputed differential-privacy budget
        self.empty_windows: dict[str, list[bool] | None] = {}  # per site that encoded windows in the last round
        self.grids: dict[str, dict[str, Grid]] = {}  # per site: patient -> source grid, as reported at init
        self.files: dict[str, dict[str, str]] = {}  # per site: patient -> the file it reads (for messages)
        # Bytes as on the wire, per site: "to_server" (activations of training steps), "to_site" (all payloads).
        self.bytes = {site: {"to_server": 0, "to_site": 0} for site in self.sites}
        self._released: defaultdict[str, Counter] = defaultdict(Counter)  # per site: patient -> protected releases
        self._gradients: dict[str, Features] = {}
        self._gradient_step: int | None = None
        self._gradient_info: dict = {}
        self._agreed: list[str] | None = None  # announced to the sites with the next round, then None

    def initialize(self, request: dict, abort_signal: Signal, fl_ctx: FLContext) -> dict[str, list[str]]:
        """Send every site the run's ``request`` (plus its ``site_index``); return the patient ids each holds (their
        source grids stay in ``grids``)."""
        payloads = {site: DXO(KIND_INIT, data={**request, "site_index": index}).to_shareable()
                    for index, site in enumerate(self.sites)}
        site_ids = {}
        for site, reply in self.broadcast(TASK_INIT, payloads, abort_signal, fl_ctx).items():
            info = dxo_of(reply, KIND_SITE_INFO, site=site).data
            site_ids[site] = check_patient_ids(info.get("patient_ids"), site=site, field="patient_ids",
                                               error=ProtocolError)
            geometry = info.get("geometry")
            if not isinstance(geometry, dict) or set(geometry) != set(site_ids[site]):
                raise ProtocolError("must map every patient the site holds to its source geometry", site=site,
                                    field="info.geometry")
            self.grids[site] = {pid: reported_grid(entry, site, pid) for pid, entry in geometry.items()}
            self.files[site] = {pid: str(entry.get("file", ""))[:200] for pid, entry in geometry.items()}
            if info.get("modality") not in MODALITIES:
                raise ProtocolError(f"unknown modality {_shown(info.get('modality'))}", site=site, field="modality")
            refuse_blocked_levels(site, _levels(info, "blocked_levels", site) or [], self.config.network.sent_levels)
            self.controller.log_info(fl_ctx, f"site {site}: modality {info['modality']}, "
                                             f"{len(site_ids[site])} patients")
        return site_ids

    def announce(self, agreed: list[str]) -> None:
        """With the next round the sites learn the patients every party holds, and answer only for those."""
        self._agreed = list(agreed)

    def hold_gradients(self, gradients: Sequence[Features], info: dict) -> None:
        """The gradients of this round's activations (site order), delivered with the next round."""
        self._gradients = dict(zip(self.sites, gradients))
        self._gradient_step, self._gradient_info = self.step, dict(info)

    def exchange(self, task_name: str, patient_ids: list[str], abort_signal: Signal, fl_ctx: FLContext,
                 info: dict | None = None, absent: str | None = None, batch: int | None = None,
                 spatial: Sequence[int] | None = None) -> list[Features]:
        """One round trip: pending gradients + next request out, checked activations back, in site order.

        Each site answers with activations of ``batch`` inputs (default one per patient) of ``spatial`` shape
        (default the training input). The ``absent`` site (modality dropout) only gets its pending gradient, no
        patients, and answers with no features (an empty dict in its place); so does a lost site.
        """
        self.step += 1
        self.rounds_of[task_name] += 1
        active = [site for site in self.sites if site not in self.lost]
        requested = {site: [] if site == absent else patient_ids for site in active}
        info = {**(info or {}), **(self._gradient_info if self._gradients else {})}
        start_up = False
        if self._agreed is not None:  # once, with the first request: sites then refuse any other patient
            info["agreed_patients"], self._agreed = self._agreed, None
            start_up = self.config.privacy_warmup_steps > 0  # and take their privacy warm-up first
        payloads = {}
        for site in active:
            message = TensorMessage(KIND_REQUEST, self.step, requested[site], self._gradients.get(site, {}),
                                    tensor_step=self._gradient_step if self._gradients else None, info=info)
            payloads[site], n_bytes = message.to_shareable(self.wire_dtype)
            self.bytes[site]["to_site"] += n_bytes
        self._gradients, self._gradient_step, self._gradient_info = {}, None, {}
        replies = self.broadcast(task_name, payloads, abort_signal, fl_ctx, start_up=start_up)
        features, self.empty_windows = [], {}
        for site in self.sites:
            if site not in replies:  # lost: nothing from it, in this round or since an earlier one
                features.append({})
                continue
            ids = requested[site]
            expected = activation_shapes(self.config, batch or len(ids), spatial) if ids else {}
            message = read_activations(replies[site], site=site, step=self.step, patient_ids=ids, expected=expected)
            self.reply_info[site] = check_site_report(message.info, site)
            if "windows" in info and ids:
                self.empty_windows[site] = check_empty_windows(message.info, site, batch or len(ids))
            if any(key.startswith("dp_") for key in message.info):  # a site's ActivationClipNoise reports its budget
                released = self._released[site]
                levels = protected_levels(message.info, list(message.tensors), site)
                for pid in message.patient_ids:
                    released[pid] += levels
                self.privacy[site] = check_privacy_report(message.info, site, max(released.values(), default=0))
            if task_name == TASK_TRAIN:
                self.bytes[site]["to_server"] += message.wire_bytes
            features.append(message.tensors)
        return features

    def broadcast(self, task_name: str, payloads: dict[str, Shareable], abort_signal: Signal,
                  fl_ctx: FLContext, start_up: bool = False) -> dict[str, Shareable]:
        """Every site its own task, all in flight at once (``transport``); wait for all of them. A site that does
        not answer is lost (``lose``): the job stops, or the round goes on with the others' replies. The init task
        and a ``start_up`` round (the sites' privacy warm-up) may take ``init_timeout``, every other
        ``task_timeout``."""
        timeout = self.init_timeout if task_name == TASK_INIT or start_up else self.task_timeout
        answers = self.transport.exchange(task_name, payloads, timeout, abort_signal, fl_ctx)
        if abort_signal.triggered:  # NVFlare's decision; its server log names the cause
            raise ProtocolError("NVFlare aborted the job (it fails a job whose process at a site ends, naming the "
                                "site in the server's log; or an admin aborted it)", field=task_name)
        replies = {}
        for site, answer in answers.items():
            if isinstance(answer, str):
                self.lose(site, answer, task_name, fl_ctx)
            else:
                replies[site] = answer
        return replies

    def lose(self, site: str, reason: str, task_name: str, fl_ctx: FLContext) -> None:
        """Apply the job's ``on_site_failure`` policy to a site that did not answer."""
        if self.on_site_failure == "stop" or task_name == TASK_INIT:
            raise ProtocolError(reason, site=site, field=task_name)
        self.lost[site] = {"reason": reason, "task": task_name, "round": self.step, "train_step": self.train_step,
                           "detected_at": time.time()}
        if len(self.lost) == len(self.sites):
            raise ProtocolError(f"every site is lost, the last one: {reason}", site=site, field=task_name)
        self.controller.log_warning(fl_ctx, f"site {site} lost at training step {self.train_step} ({reason}); going "
                                            f"on without its modality (policy on_site_failure=continue)")

    def present(self, absent: int | None = None) -> list[bool] | None:
        """The fusion's mask: every site but the lost ones and the one left out by modality dropout."""
        left_out = {self.sites.index(site) for site in self.lost} | ({absent} if absent is not None else set())
        return present_inputs(left_out, len(self.sites))

    def windows_without_image(self, windows: int) -> list[bool]:
        """Which windows of the last round hold no image at any site that encoded them (all False where one of
        them did not say)."""
        flags = list(self.empty_windows.values())
        if not flags or any(site_flags is None for site_flags in flags):
            return [False] * windows
        return [all(window) for window in zip(*flags)]

    def answered(self) -> list[str]:
        """The sites that answered the last round (not lost)."""
        return [site for site in self.sites if site in self.reply_info and site not in self.lost]

    def bytes_per_step(self, steps: int) -> dict:
        """Tensor bytes of one training step as on the wire over ``steps`` training steps: activations received
        and gradients sent, all sites and per site (each direction); validation tensors are left out."""
        steps = max(1, steps)
        per_site = {site: {direction: int(n / steps) for direction, n in counts.items()}
                    for site, counts in self.bytes.items()}
        activations = sum(counts["to_server"] for counts in per_site.values())
        gradients = sum(counts["to_site"] for counts in per_site.values())
        return {"activations": activations, "gradients": gradients, "total": activations + gradients,
                "codec": self.wire_dtype, "per_site": per_site}

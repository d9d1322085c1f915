"""The defence the shipped sites and the shipped job use by default, defined once: switch it here.

A defence has a part each site enforces itself, in the default scope of its privacy policy (``DEFENDED_SCOPE``,
written by ``site_configs``), whatever a job asks for, and a part the shipped job carries (``jobs``):

- ``blocked_levels``: U-Net levels that never leave a site (``LevelBlocking``); the job's network sends every
  other level of its depth, and a job whose network needs a blocked level is refused at start naming the site;
- ``site_training``: training settings a site requires at least (``TrainingRequirements``), e.g. NoPeek's
  weight; the job asks for exactly these, and a job asking for less is refused at the site;
- ``site_filters``: further filters on what a site sends (e.g. ``ActivationClipNoise``), in the scope;
- ``server_filters``: filters on the gradients the server sends back: the label holder protects its own labels
  (a site cannot enforce them; a hostile server would simply leave them out);
- ``label_sampling``: whether the site accepts patch corners that the label holder centred on tumour (False: a
  job asking for them is refused at start, naming the site); the job's patches are sampled so by default where
  it is allowed (``jobs.train_config``).

The undefended configuration is the explicit opt-in scope ``UNDEFENDED_SCOPE``: no filters, for phantoms and
studies only (a job asking for it is undefended too: ``job_defence``). ``STRICT_SCOPE`` is the opt-in for a site
that must keep every measured attack at the prior whatever it costs in Dice. Measured privacy and utility of the
configurations: docs/privacy.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DEFENCE", "DEFENDED_SCOPE", "SCOPES", "STRICT", "STRICT_SCOPE", "UNDEFENDED", "UNDEFENDED_SCOPE", "Defence",
           "job_defence"]

DEFENDED_SCOPE = "clinical"
STRICT_SCOPE = "strict"
UNDEFENDED_SCOPE = "undefended"


@dataclass(frozen=True)
class Defence:
    """See the module docstring for the fields."""

    name: str
    blocked_levels: tuple[int, ...] = ()
    site_training: Mapping[str, float] = field(default_factory=dict)
    site_filters: tuple[dict, ...] = ()
    server_filters: tuple[dict, ...] = ()
    label_sampling: bool = True

    def site_scope(self, name: str, properties: dict) -> dict:
        """The privacy scope (``local/privacy.json``) that makes a site enforce its part."""
        requirements = {"minimum": dict(self.site_training)} if self.site_training else {}
        if not self.label_sampling:
            requirements["allow_label_sampling"] = False
        data_filters = [{"path": "split_unet.filters.TrainingRequirements", "args": requirements}] if requirements \
            else []
        result_filters = [{"path": "split_unet.filters.LevelBlocking",
                           "args": {"blocked_levels": list(self.blocked_levels)}}] if self.blocked_levels else []
        return {"name": name, "properties": properties, "task_data_filters": data_filters,
                "task_result_filters": result_filters + [dict(spec) for spec in self.site_filters]}

    def sent_levels(self, depth: int) -> list[int]:
        """The levels a network of ``depth`` levels sends under this defence."""
        return [level for level in range(depth) if level not in self.blocked_levels]


# Label sampling is refused by the defended scopes: the corners a site receives map the tumour far better than the
# gradient attack the label holder's noise was chosen against (docs/performance.md, "What label sampling
# tells the sites").
# The recommended point of the privacy sweep (docs/privacy.md): no full-resolution level; at the sites NoPeek 1.0
# and a privacy warm-up of 96 local NoPeek steps before the first release (without it the white-box inversion
# reads the random encoder's step-1 activations at SSIM 0.82-0.90); gradient noise at ten times each sample's
# gradient RMS at the server. It stops the white-box inversion at every recorded step and the label attack, not a
# decoder learned with query access (+0.33 to +0.35 SSIM over the prior at the worst site, at steps 1, 96 and 192);
# only sending the bottleneck alone did, at 0.26 mean Dice (docs/privacy.md, the frontier against the learned attack).
DEFENCE = Defence(
    name="no full-res + NoPeek 1.0 + warm-up 96 + gradient noise x10",
    blocked_levels=(0,),
    site_training={"nopeek_weight": 1.0, "privacy_warmup_steps": 96},
    server_filters=({"path": "split_unet.filters.GradientProtection",
                     "args": {"mode": "noise", "noise_multiplier": 10.0}},),
    label_sampling=False,
)
# The only point of the frontier that kept every attack (white-box, UnSplit, learned, surrogate) at or below the
# prior at every recorded step: the bottleneck alone, with the shipped warm-up (worst excess SSIM -0.07 over the
# atlas, residual -0.10 over another patient's image; labels 0.09), at a mean Dice cost of 0.272 (docs/privacy.md,
# "The frontier"). Levels 0-2 are blocked: the bottleneck of the default
# four-level network.
STRICT = Defence(
    name="bottleneck only + NoPeek 1.0 + warm-up 96 + gradient noise x10",
    blocked_levels=(0, 1, 2),
    site_training=DEFENCE.site_training,
    server_filters=DEFENCE.server_filters,
    label_sampling=False,
)
UNDEFENDED = Defence(name="undefended")
SCOPES = {DEFENDED_SCOPE: DEFENCE, STRICT_SCOPE: STRICT, UNDEFENDED_SCOPE: UNDEFENDED}


def job_defence(scope: str | None) -> Defence:
    """The defence a job carries: that of the scope it asks for (``SCOPES``); ``DEFENCE`` for no scope (the sites'
    default, the defended one) or a scope the package does not define (the sites refuse it or enforce their own)."""
    return SCOPES.get(scope or DEFENDED_SCOPE, DEFENCE)

"""Studies on trained runs: leakage attacks on recorded exchanges, the privacy-utility sweep, missing-modality
validation. They need the ``studies`` extra (scikit-image, matplotlib); the library never imports them."""

# The attacks ``split-unet leakage`` runs (``studies.leakage``), here where the command line reads them without the
# extra's imports.
ATTACKS = ("whitebox", "unsplit", "learned", "surrogate", "completion", "labels")

"""Studies on trained runs: leakage attacks on recorded exchanges, the privacy-utility sweep, missing-modality
validation. They need the ``studies`` extra (scikit-image, matplotlib); the library never imports them."""

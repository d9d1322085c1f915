"""Launchers: the command line's training options, the NVFlare simulator, POC federations, the benchmark and
split inference runs. They build jobs with ``split_unet.jobs`` and run them; the library never imports them."""

"""File names the parties write and the jobs name: each defined here once."""

#: Each site's trained encoder, in its run folder (``ModalitySiteExecutor(encoder_file=...)``).
ENCODER_FILE = "split_unet_encoder.pt"
#: The server's trained decoder, in its app folder (the training job's ``PTFileModelPersistor``).
DECODER_FILE = "split_unet_decoder.pt"
#: TensorBoard event files, in the server's run folder (``TBAnalyticsReceiver(tb_folder=...)``).
TENSORBOARD_FOLDER = "tb_events"
#: The inference job's segmentations and their ``inference.json``, in the server's run folder.
SEGMENTATIONS = "segmentations"

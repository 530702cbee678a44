"""capjax's trainer: the training and decoding core in this package (the
loop in `train` and its parts, the step, checkpoints, writers, sharding,
generation, `capjax eval`, the command line), models in `trainer.models`,
the COCO caption evaluation in `trainer.metrics`, Hugging Face import and
export in `trainer.hf`."""

"""Hugging Face interop: `weights` (the one table between a
`VisionEncoderDecoderModel` state dict and capjax's parameters), `importer`
(`capjax import-hf`: an HF checkpoint to a run directory) and `exporter`
(`capjax export-hf`: a checkpoint to a folder `from_pretrained` loads, LoRA
merged or in peft's format, optionally pushed to the Hub)."""

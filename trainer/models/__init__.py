"""The models, in Flax NNX, layer for layer as Hugging Face's PyTorch ones:
`vit` (ViTModel), `gpt2` (GPT2LMHeadModel with cross-attention), `captioner`
(VisionEncoderDecoderModel), their shared `layers`, and `lora` adapters."""

"""The COCO caption evaluation, in-process: `caption_metrics` (BLEU-1..4,
ROUGE-L, CIDEr-D, METEOR, ROUGE-1/2/Lsum), `ptb_tokenizer` and `ptb_rules`
(the evaluation's PTB tokenization, without Java), `score_files` (`capjax
metrics`: prediction and reference files to scores) and `coco_caption/` (the
same scores as a Hugging Face `evaluate` module, loaded from its path)."""

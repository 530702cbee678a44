"""capjax's input side: `sources` and `prepare` (caption data to ArrayRecord
shards), `records` (the prepared format), `transforms` (decoding, resizing,
tokenizing, batches), `loader` (the training stream), `tokenizer`,
`synthetic` (the embedded demo data) and `atomic` (outputs that appear whole
or not at all)."""

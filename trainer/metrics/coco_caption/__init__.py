"""capjax's COCO caption metrics as a Hugging Face `evaluate` module, loaded
from this folder without a hub:

  import evaluate, trainer.metrics.coco_caption
  metric = evaluate.load(trainer.metrics.coco_caption.PATH)
  metric.compute(predictions=["a dog"], references=[["A dog runs.", "a brown dog"]])
"""

import os

PATH = os.path.dirname(os.path.abspath(__file__))

"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) as the COCO caption
evaluation (pycocoevalcap) computes them, PTB tokenization included, in
Python: capjax's `trainer.metrics.caption_metrics` behind `evaluate`'s interface."""

import datasets
import evaluate

from trainer.metrics import caption_metrics

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: one caption per image.
    references: the reference captions of each image (a list per image).
Returns:
    bleu1, bleu2, bleu3, bleu4, rouge_l, cider: floats, as pycocoevalcap
    reports them (CIDEr-D x10).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CocoCaption(evaluate.Metric):

  def _info(self):
    return evaluate.MetricInfo(
        description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
        features=datasets.Features({"predictions": datasets.Value("string"),
                                    "references": datasets.Sequence(datasets.Value("string"))}))

  def _compute(self, predictions, references):
    return caption_metrics.score(list(predictions), [list(r) for r in references])

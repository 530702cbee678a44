"""`capjax prepare --runner beam`: the same shards, written by Apache Beam.

The pipeline is the shards still to write (each its number and its unit,
which carries only its own input), reshuffled over the workers, each written
by `shards.write_shard` as the local runner writes it; the manifest is
written by the launching process when the pipeline is done.
Beam's pipeline options choose the engine (Dataflow, Flink, Spark); without
`--runner` it runs on this machine with Beam's FnApiRunner in worker
processes (Beam's default local runner first tries to download a Prism
binary). The output folder must be one that every worker writes to.
"""

from __future__ import annotations

import shlex
from typing import Any, Sequence

from pipeline import shards
from pipeline.sources import SourceError


def options(beam_options: str, workers: int) -> list[str]:
  """Beam's pipeline arguments: the user's, with the local runner pinned
  when they name none."""
  args = shlex.split(beam_options)
  if not any(a == "--runner" or a.startswith("--runner=") for a in args):
    args += ["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
             f"--direct_num_workers={workers}"]
  return args


def run(out_dir: str, units: Sequence[Any], todo: Sequence[int], opts: shards.Options,
        beam_options: str, workers: int) -> None:
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    raise SourceError("--runner beam needs Apache Beam: pip install 'capjax[beam]'") from None

  count = len(units)

  class WriteShard(beam.DoFn):
    def process(self, task: tuple[int, Any]):
      index, unit = task
      counts = shards.write_shard(out_dir, index, count, unit, opts)
      beam.metrics.Metrics.counter("capjax", "records").inc(counts["records"])
      beam.metrics.Metrics.counter("capjax", "skipped").inc(sum(counts["skipped"].values()))
      yield index

  with beam.Pipeline(options=PipelineOptions(options(beam_options, workers))) as p:
    _ = (p | "shards" >> beam.Create([(i, units[i]) for i in todo]) | beam.Reshuffle()
         | "write" >> beam.ParDo(WriteShard()))

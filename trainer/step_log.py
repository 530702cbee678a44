"""The train loop's log of each step: scalars to the writers, speed and MFU
every `train.log_every` steps, a console line with the ETA, and the count of
skipped records and non-finite steps.

A step's metrics are read one step late, while the next step runs, so that
reading them never stalls the device.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
from ml_collections import ConfigDict


class NonFiniteStep(Exception):
  """A step whose loss or gradients were not finite, under `train.nonfinite=stop`."""

  def __init__(self, step: int, metrics: dict[str, float]):
    super().__init__(step)
    self.step, self.metrics = step, metrics


def eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class StepLog:
  """Logs the steps of a run that starts after `start` and ends at `cfg.train.steps`.

  `flops` gives XLA's FLOP count for one device's share of a step (None until
  the step is compiled, or where the backend does not count); `peak` is the
  device's peak FLOP/s, for the MFU. `samples` gives, for a training mixture,
  the samples drawn from each source through a step: `data/samples/NAME`.
  """

  def __init__(self, cfg: ConfigDict, writer: Any, start: int,
               flops: Callable[[], float | None], peak: float | None,
               samples: Callable[[int], dict[str, int]] | None = None):
    self._cfg, self._writer, self._flops, self._peak = cfg, writer, flops, peak
    self._samples = samples
    self._total = cfg.train.steps
    self._pending: tuple[int, Any] | None = None
    self._t, self._s, self._wait, self._tokens = time.time(), start, 0.0, 0.0
    self.skipped = 0  # unusable records this process's run met (data.bad_records=skip)
    self.nonfinite = 0  # steps skipped as not finite (train.nonfinite=skip)
    self.last: dict[str, float] = {}  # the last logged step's scalars

  def waited(self, seconds: float) -> None:
    """Time the loop spent waiting for data."""
    self._wait += seconds

  def push(self, step: int, metrics: Any) -> None:
    """This step's metrics (device arrays), logged when the next step arrives
    or at `flush`; logs the step before it now."""
    self._log_held()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Logs the step still held, and writes the writers' buffers out."""
    self._log_held()
    self._writer.flush()

  def _log_held(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._log(*pending)

  def _log(self, s: int, metrics: Any) -> None:
    last = self.last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.skipped += int(last["train/skipped_records"])
    self._tokens += last["train/tokens"]
    if self._samples is not None:
      last.update({f"data/samples/{name}": float(n) for name, n in self._samples(s).items()})
    self._writer.write_scalars(s, last)
    if last["train/nonfinite"]:
      self.nonfinite += 1
      if self._cfg.train.nonfinite == "stop":
        raise NonFiniteStep(s, last)
      print(f"step {s}: loss {last['train/loss']}, grad norm {last['train/grad_norm']}: "
            "update skipped (train.nonfinite=skip)", flush=True)
    if s % self._cfg.train.log_every == 0 or s == self._total:
      self._log_speed(s)

  def _log_speed(self, s: int) -> None:
    dt = time.time() - self._t
    rate = (s - self._s) / dt
    batch = self._cfg.train.batch_size
    speed = {"train/steps_per_second": rate, "train/step_time_s": 1.0 / rate,
             "train/images_per_second": rate * batch,
             "train/tokens_per_second": self._tokens / dt,
             "train/data_wait_fraction": self._wait / dt}
    flops = self._flops()
    if flops:
      speed["train/tflops_per_device"] = flops * rate / 1e12
      if self._peak:
        speed["train/mfu"] = flops * rate / self._peak
    self._writer.write_scalars(s, speed)
    reward = (f"  reward {self.last['scst/reward']:.4f}" if "scst/reward" in self.last else "")
    print(f"step {s}/{self._total}  loss {self.last['train/loss']:.4f}{reward}  "
          f"{rate:.2f} steps/s  "
          f"ETA {eta((self._total - s) / rate)}" +
          (f"  ({self.skipped} unusable records skipped)" if self.skipped else "") +
          (f"  ({self.nonfinite} non-finite steps skipped)" if self.nonfinite else ""),
          flush=True)
    self._t, self._s, self._wait, self._tokens = time.time(), s, 0.0, 0.0

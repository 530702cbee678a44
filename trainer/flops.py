"""FLOPs of a compiled step (XLA's own count) and the chips' peak, for the
model FLOPs utilisation (MFU) that the train loop logs."""

from __future__ import annotations

from typing import Any

# Dense bfloat16 peak FLOP/s per device, by the start of `device_kind`.
PEAK_BF16 = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5 lite (v5e)
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override` if set, else the table's; None if unknown."""
  if override > 0:
    return override
  for prefix, peak in PEAK_BF16:
    if device_kind.startswith(prefix):
      return peak
  return None


def step_flops(lowered: Any, devices: int) -> float | None:
  """FLOPs one device spends on one call of a step: XLA's count of the step
  as traced (matrix products by their shapes, before any optimisation), over
  the devices that share it. The count of the compiled step would depend on
  the backend: on the CPU, matrix products that become library calls are not
  counted at all."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # not every backend counts
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) / devices if flops and flops > 0 else None

"""The XLA flags the cluster launchers set for the chips they start: the
scheduler that overlaps collectives with compute, and collectives combined
into fewer, larger transfers, as MaxText and NVIDIA's JAX-Toolbox set them.
A value already in the job's environment wins (`${XLA_FLAGS:-...}`), so a
user's own flags replace these whole."""

# XLA_FLAGS on NVIDIA GPUs. Each is known to XLA (tests/test_launch.py starts
# JAX with them); an unknown flag would stop every process at start-up.
GPU = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    # Gradients' all-reduces (data) and FSDP's all-gathers and reduce-scatters
    # combined up to these sizes, then pipelined across the layers' loop.
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)

# LIBTPU_INIT_ARGS on TPUs: collectives fused asynchronously and overlapped
# with the TensorCore's compute, the data-parallel all-reduce optimised.
TPU = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)

VARIABLE = {"gpu": "XLA_FLAGS", "tpu": "LIBTPU_INIT_ARGS"}
FLAGS = {"gpu": GPU, "tpu": TPU}


def shell_export(platform: str) -> str:
  """A shell line that sets the platform's variable unless it is set."""
  var, flags = VARIABLE[platform], " ".join(FLAGS[platform])
  return f'export {var}="${{{var}:-{flags}}}"'

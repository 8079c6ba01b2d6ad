"""ep_bench with the comm_ctas communicators on a HIGH-PRIORITY NCCL stream (probe, not committed code)."""
import functools
import torch.distributed as dist
from kernels.a2a_overlap import schedule
from autotune import ep_bench


@functools.lru_cache(maxsize=None)
def _hp_group(ranks, comm_ctas):
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    if dist.get_rank() == 0:
        print("hp group", comm_ctas, options.is_high_priority_stream, flush=True)
    options.config.max_ctas = comm_ctas
    options.config.min_ctas = 1
    return dist.new_group(list(ranks), backend="nccl", pg_options=options)


schedule._nccl_group = _hp_group

if __name__ == "__main__":
    raise SystemExit(ep_bench.main())

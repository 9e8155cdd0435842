"""Multi-process start-up on JAX's own distributed runtime (gloo on CPU, NCCL on GPU, ICI on TPU).

Every process runs the same script (SPMD). Call :func:`initialize` before any JAX computation:

* explicit: ``JTINKER_COORDINATOR_ADDRESS`` (or ``JAX_COORDINATOR_ADDRESS``), ``JTINKER_NUM_PROCESSES``
  and ``JTINKER_PROCESS_ID`` (or the ``JAX_`` spellings);
* cluster schedulers: under SLURM, Open MPI or on a Cloud TPU VM, JAX detects the values itself.

``JTINKER_LOCAL_DEVICES=N`` gives each CPU process N devices (for testing meshes on one machine).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger("jtinker")
_SCHEDULER_HINTS = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def initialize() -> bool:
    """Starts ``jax.distributed`` when the environment asks for it; returns True if it did."""
    local_devices = _env("JTINKER_LOCAL_DEVICES")
    if local_devices:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    address = _env("JTINKER_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    if address:
        num = _env("JTINKER_NUM_PROCESSES", "JAX_NUM_PROCESSES")
        pid = _env("JTINKER_PROCESS_ID", "JAX_PROCESS_ID")
        if num is None or pid is None:
            raise ValueError(
                "JTINKER_NUM_PROCESSES and JTINKER_PROCESS_ID are required with a coordinator address"
            )
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num), process_id=int(pid))
    elif any(os.environ.get(n) for n in _SCHEDULER_HINTS):
        jax.distributed.initialize()  # JAX's cluster detection fills in the rest
    else:
        return False
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_primary() -> bool:
    """Only process 0 writes logs, progress and metrics."""
    return jax.process_index() == 0


def from_process_zero(words: np.ndarray) -> np.ndarray:
    """Process 0's ``uint32`` words on every process: host values that every process of an SPMD
    program must feed alike (fresh random seeds, run ids). A collective: all processes call it."""
    words = np.asarray(words, np.uint32)
    if jax.process_count() == 1:
        return words
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)

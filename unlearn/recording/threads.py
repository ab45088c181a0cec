"""One OpenMP thread count for torch for the whole process, whatever numba's kernels do."""

import numba
import torch


def hold_torch_threads() -> int:
    """Start numba's thread pool now, keeping torch's CPU thread count as it is; returns that count.

    Numba's OpenMP threading layer, the first time a parallel kernel runs (or its thread
    count is asked), calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` on the calling
    thread. Torch's CPU kernels read that same OpenMP setting, so their thread count (and
    with it the float summation order of a matmul's or a convolution's reduction) changed
    in the middle of a run: under torchrun (``OMP_NUM_THREADS=1``) the first step's backward
    ran on one thread and every later step's on NUMBA_NUM_THREADS (all cores by default), as
    soon as the update flavour's preconditioner had run once. A resumed run's first step ran
    on one thread where the uninterrupted run's ran on all cores, so the resume was not
    bit-exact (issue 21; tests/test_resume_exact.py). Launched here,
    before any step, numba's one-time call is undone once and cannot come again: torch keeps
    the count it was configured with (``OMP_NUM_THREADS``, ``torch.set_num_threads``) for
    the whole process, and numba's kernels keep their own.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()  # launches numba's threads when nothing has yet
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads

"""python -m bench {store,scatter,positions,codecs,scale,footprint,throughput,protocol,study,backdoor,diagnose,candidates,memorised,crash,corrupt,purge,lm} ...: benchmarks (see README and docs/RESULTS.md)."""

import argparse
import os
import sys

# REFERENCE.md: with 2 torch/OpenMP threads this VM sometimes parks both on one vCPU;
# these settings make timings stable. They must be set before the process starts.
# OMP_WAIT_POLICY=passive rather than OMP_PROC_BIND/OMP_PLACES: binding pins the main
# thread (and so numba's pool and the zstd threads, which inherit its affinity) to CPU 0.
STABLE_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "OMP_WAIT_POLICY": "passive",
}


def _reexec_with_stable_env():
    if os.environ.get("BENCH_STABLE_ENV") == "1":
        return
    env = dict(os.environ, BENCH_STABLE_ENV="1", **{k: v for k, v in STABLE_ENV.items() if k not in os.environ})
    os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], env)


def main():
    from gradstore.cli import run_reporting_errors

    from . import backdoor, candidates, codecs_study, corrupt, crash, diagnose, footprint, lm, memorised, positions, protocol, purge, scale, scatter, store, study, throughput

    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks of the gradient store and of unlearning.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, summary in (
        ("store", store, "bytes/value, ingest, read, scatter, forget on real gradients"),
        ("scatter", scatter, "scatter_add of finished stores, side by side in rounds: each codec against int8"),
        ("positions", positions, "mask positions per second, bit for bit against another revision's (--against)"),
        ("codecs", codecs_study, "int8 block size and error growth over epochs"),
        ("footprint", footprint, "analytic vs measured bytes of every method"),
        ("throughput", throughput, "recording overhead, ingest, forget latency vs retrain"),
        ("protocol", protocol, "the seed's MNIST protocol: every method vs retrain"),
        ("scale", scale, "one recording with 1 and with N torchrun ranks: seconds per step, bytes, equal stores"),
        ("diagnose", diagnose, "why a backdoor outlives its rows: dense against masked and int8 rows, swept over steps"),
        ("candidates", candidates, "the removal rules and searches tried before the feature rule (bench diagnose's runs)"),
        ("memorised", memorised, "the feature rule and find_similar on the diagnosed poisoned runs, against retrain"),
        ("crash", crash, "SIGKILL recordings at random moments; verify, resume, compare with an uninterrupted run"),
        ("corrupt", corrupt, "flip random bytes in a store: every read right or an error naming rows; checksum cost"),
        ("purge", purge, "time to erase forgotten rows against the store's size"),
        ("study", study, "the seed's tables: every codec, flavour and p, class, sample and poisoned requests, plots"),
        ("backdoor", backdoor, "a poisoned request's removal variants: ASR against the target class and TA"),
        ("lm", lm, "a byte-level GPT-2 on the stdlib with planted canaries: exposure after train, retrain, forget_keys"),
    ):
        sub = commands.add_parser(name, help=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args()
    return run_reporting_errors("bench", args.command, lambda: args.run(args))


if __name__ == "__main__":
    _reexec_with_stable_env()
    sys.exit(main())

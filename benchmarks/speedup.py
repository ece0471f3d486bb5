#!/usr/bin/env python
"""Throughput: synthpipe (backprop, DNI, cDNI) against single-device backprop and
torch.distributed.pipelining on a deep MLP, with the simulator check and scaling table.

The same code as ``synthpipe bench --no-converge``; every ``synthpipe bench`` option works:

    python benchmarks/speedup.py --quick            # ~1 minute on 2 cores
    python benchmarks/speedup.py --output results/speedup
"""
import sys

from synthpipe.benchmark.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-converge" not in argv:
        argv.append("--no-converge")
    sys.exit(main(["bench", *argv]))

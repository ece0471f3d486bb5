#!/usr/bin/env python
"""Time to accuracy: every method trains the DNI paper's MLP on MNIST-1D for the same
number of epochs; test accuracy against training wall-clock (``accuracy_vs_time.png``).

The same code as ``synthpipe bench --no-throughput`` (torch schedules then use m = 4
unless given ``--microbatches``); every ``synthpipe bench`` option works:

    python benchmarks/time_to_accuracy.py --conv-epochs 30 --conv-target 0.6
"""
import sys

from synthpipe.benchmark.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-throughput" not in argv:
        argv.append("--no-throughput")
    sys.exit(main(["bench", *argv]))

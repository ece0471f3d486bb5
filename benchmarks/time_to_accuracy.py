#!/usr/bin/env python
"""Time to accuracy: every method trains the wide BN-MLP (``wide_mlp``) on MNIST-1D for the
same number of epochs, in one run: single-device backprop, torch.distributed.pipelining's
gpipe and 1f1b, synthpipe backprop, and the gradient sources cDNI, delayed, delayed with
weight prediction, local and interlocking. Reports each method's wall-clock time to the
target (single-device backprop's final accuracy minus 1 point), its ratio to single-device
backprop's and to the best torch schedule's, epochs and steps to the target, final and best
accuracy, samples/s and peak memory per rank; plots ``accuracy_vs_time.png`` and
``accuracy_vs_steps.png``.

The same code as ``synthpipe bench --no-throughput`` (torch schedules then use m = 4
unless given ``--microbatches``); every ``synthpipe bench`` option works:

    python benchmarks/time_to_accuracy.py --quick            # ~3 min on 2 cores (hidden 512, depth 5, 5 epochs)
    python benchmarks/time_to_accuracy.py                    # ~12 min (hidden 1024, depth 7, 20k samples, 5 epochs)
    python benchmarks/time_to_accuracy.py --conv-sources delayed:predict,local --conv-epochs 10
"""
import sys

from synthpipe.benchmark.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-throughput" not in argv:
        argv.append("--no-throughput")
    sys.exit(main(["bench", *argv]))

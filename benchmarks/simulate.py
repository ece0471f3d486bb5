#!/usr/bin/env python
"""Predict single-device, naive model parallel, GPipe, 1F1B, zero-bubble and synthpipe DNI
on 2..16 devices from a profile saved by ``synthpipe bench`` (same as ``synthpipe simulate``):

    python benchmarks/simulate.py --profile bench-results/profile.json --devices 2,4,8,16 --validate
"""
import sys

from synthpipe.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))

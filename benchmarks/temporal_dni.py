#!/usr/bin/env python
"""Temporal DNI against plain truncated BPTT at the same truncation T, on the DNI paper's tasks.

* copy and repeat copy: a curriculum (Graves et al., 2014; the DNI paper) starts at one
  pattern (and one repeat) and lengthens the task each time the error on a fixed
  evaluation batch falls below ``--solved`` bits per step (0.15, as in the paper); the
  longest task solved within the same number of training steps is reported.
* character LM on the standard library's Python sources (``synthpipe.text.char_lm``):
  test bits per character after the same number of steps.

Each sequence starts from a zero state at a chunk boundary, so with T shorter than the
distance between a pattern and its copy, plain truncated BPTT gets no gradient across
it. Everything runs in one process on one torch thread; prints the tables (markdown) and
writes the plot to ``docs/images/temporal_dni.png``::

    python benchmarks/temporal_dni.py                 # ~6 minutes on one busy core
    python benchmarks/temporal_dni.py --quick         # ~1 minute
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.benchmark.machine import describe, summary_line
from synthpipe.sequences import CopyTask, bits_per_char, bits_per_step, char_lm_loss, masked_bce
from synthpipe.text import VOCAB_SIZE, char_lm

METHODS = {"bptt": "truncated BPTT", "dni": "DNI", "dni+aux": "DNI + aux"}
STYLES = {"bptt": "-", "dni": "--", "dni+aux": ":"}  # lines that coincide stay visible


def make_trainer(method: str, core: nn.Module, head: nn.Module, loss_fn, args, **options) -> sp.TemporalTrainer:
    def adam(lr):
        return ((lambda p: torch.optim.Adam(p, lr=lr)))
    synth = None if method == "bptt" else sp.Synthesizer("linear")
    return sp.TemporalTrainer(core, head, loss_fn, truncation=args.truncation, synthesizer=synth,
                              optimizer=adam(args.lr), synth_optimizer=adam(args.synth_lr),
                              synthetic_scale=args.synthetic_scale, aux_future=method == "dni+aux",
                              aux_weight=args.aux_weight, **options)


def curriculum(task: str, method: str, args) -> dict:
    """Train one method through the copy / repeat-copy curriculum; the longest task solved."""
    torch.manual_seed(args.seed)
    width = args.bits + (1 if task == "copy" else 2)
    out = args.bits + (0 if task == "copy" else 1)
    core, head = nn.LSTM(width, args.hidden, batch_first=True), nn.Linear(args.hidden, out)
    trainer = make_trainer(method, core, head, masked_bce, args)
    n, r = 1, 1
    best = {"n": 0, "r": 0, "length": 0}
    trace = []  # (step, length of the current task, error)
    solved_at = []  # "length@step" each time a length is solved
    gen = torch.Generator().manual_seed(args.seed)
    start, step = time.perf_counter(), 0
    while step < args.copy_steps and time.perf_counter() - start < args.copy_seconds:
        stream = CopyTask(n, args.batch, bits=args.bits, repeats=None if task == "copy" else r,
                          max_repeats=args.max_repeats)
        for _ in range(args.eval_every):
            trainer.step(*stream.batch(gen))
            step += 1
        eval_batch = CopyTask(n, args.eval_batch, bits=args.bits, repeats=stream.repeats,
                              max_repeats=args.max_repeats).batch(torch.Generator().manual_seed(10_000 + n * 97 + r))
        error = bits_per_step(trainer.predict(eval_batch[0]), eval_batch[1])
        length = n if task == "copy" else n * r
        trace.append((step, length, error))
        if error < args.solved:
            best = {"n": n, "r": r, "length": length}
            solved_at.append(f"{length}@{step}")
            if task == "copy":
                n += 1
            elif n <= r:  # repeat copy: lengthen N and R in turn
                n += 1
            else:
                r = min(r + 1, args.max_repeats)
    return {"task": task, "method": method, **best, "steps": step,
            "seconds": round(time.perf_counter() - start, 1),
            "solved_at": solved_at, "trace": trace}


class CharCore(nn.Module):
    """Byte embedding + LSTM: a user core whose state is nn.LSTM's (layers, B, H) pair."""

    def __init__(self, hidden: int, embed: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)

    def forward(self, x, state=None):
        return self.lstm(self.embed(x), state)


def char_lm_run(method: str, train, test, args) -> dict:
    torch.manual_seed(args.seed)
    core, head = CharCore(args.lm_hidden), nn.Linear(args.lm_hidden, VOCAB_SIZE)
    # a user core around nn.LSTM: its state keeps the batch in dimension 1
    trainer = make_trainer(method, core, head, char_lm_loss, args, state_batch_dim=1)
    gen = torch.Generator().manual_seed(args.seed)
    xs, ys = train.tensors
    trace = []
    start = time.perf_counter()
    for step in range(1, args.lm_steps + 1):
        idx = torch.randint(0, len(xs), (args.batch,), generator=gen)
        log = trainer.step(xs[idx], ys[idx])
        trace.append((step, log.loss / xs.shape[1] / math.log(2)))
    seconds = time.perf_counter() - start
    tx, ty = test.tensors
    n = min(len(tx), args.lm_eval)
    bpc = bits_per_char(trainer.predict(tx[:n]), ty[:n])
    return {"task": "char-lm", "method": method, "test_bpc": round(bpc, 4), "steps": args.lm_steps,
            "seconds": round(seconds, 1), "trace": trace}


def plot(results: list[dict], path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, task, ylabel in ((axes[0], "copy", "N (patterns) of the task being learned"),
                             (axes[1], "repeat-copy", "N x R of the task being learned")):
        for res in (r for r in results if r["task"] == task):
            steps = [s for s, _, _ in res["trace"]]
            lengths = [length for _, length, _ in res["trace"]]
            ax.step(steps, lengths, where="post", linestyle=STYLES[res["method"]], linewidth=2,
                    label=f"{METHODS[res['method']]} (solved {res['length']})")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{task}, T = {args.truncation}")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.legend()
    ax = axes[2]
    for res in (r for r in results if r["task"] == "char-lm"):
        steps = [s for s, _ in res["trace"]]
        bpc = [b for _, b in res["trace"]]
        k = max(1, len(bpc) // 40)  # running mean over k steps
        smooth = [sum(bpc[max(0, i - k + 1):i + 1]) / len(bpc[max(0, i - k + 1):i + 1]) for i in range(len(bpc))]
        ax.plot(steps, smooth, linestyle=STYLES[res["method"]],
                label=f"{METHODS[res['method']]} (test {res['test_bpc']:.3f})")
    ax.set_title(f"char LM (stdlib sources), T = {args.truncation}")
    ax.set_xlabel("training step")
    ax.set_ylabel("training bits per char")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--truncation", type=int, default=2, help="T, steps per chunk, for every method")
    p.add_argument("--methods", default="bptt,dni,dni+aux", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--tasks", default="copy,repeat-copy,char-lm")
    p.add_argument("--hidden", type=int, default=64, help="LSTM units for the copy tasks")
    p.add_argument("--bits", type=int, default=4, help="bits per pattern (the paper: 8; 4 fits the time bound)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--synth-lr", type=float, default=3e-3)
    p.add_argument("--synthetic-scale", type=float, default=0.1)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--copy-steps", type=int, default=2000, help="training steps per curriculum run")
    p.add_argument("--copy-seconds", type=float, default=90.0, help="wall-clock cap per curriculum run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--solved", type=float, default=0.15, help="bits per step under which a length is solved")
    p.add_argument("--max-repeats", type=int, default=20)
    p.add_argument("--lm-hidden", type=int, default=64)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--lm-seq-len", type=int, default=64)
    p.add_argument("--lm-bytes", type=int, default=400_000)
    p.add_argument("--lm-eval", type=int, default=256, help="test windows scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script)")
    p.add_argument("--plot", default=os.path.join("docs", "images", "temporal_dni.png"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot from a --json file")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved["results"], args.plot, argparse.Namespace(**saved["args"]))
        print(f"plot: {args.plot}")
        return 0
    if args.quick:
        args.copy_steps, args.copy_seconds, args.lm_steps = 300, 15.0, 60
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    machine = describe(threads=args.threads)
    tasks = args.tasks.split(",")
    results = []
    for task in ("copy", "repeat-copy"):
        if task in tasks:
            for m in methods:
                results.append(curriculum(task, m, args))
                r = results[-1]
                print(f"# {task} {m}: solved N={r['n']} R={r['r']} (length {r['length']}) in {r['steps']} steps, "
                      f"{r['seconds']} s", file=sys.stderr, flush=True)
    if "char-lm" in tasks:
        train, test = char_lm(seq_len=args.lm_seq_len, max_bytes=args.lm_bytes)
        for m in methods:
            results.append(char_lm_run(m, train, test, args))
            print(f"# char-lm {m}: {results[-1]['test_bpc']} bpc", file=sys.stderr, flush=True)

    print(f"Machine: {summary_line(machine)}\n")
    print(f"Truncation T = {args.truncation} for every method; linear state synthesizer, synthetic_scale "
          f"{args.synthetic_scale}; Adam lr {args.lr} (synthesizer {args.synth_lr}); batch {args.batch}; "
          f"seed {args.seed}.\n")
    for task in ("copy", "repeat-copy"):
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        print(f"{task} ({args.bits}-bit patterns, LSTM {args.hidden}; solved: < {args.solved} bits per step; at most "
              f"{args.copy_steps} steps or {args.copy_seconds:.0f} s per run)\n")
        print("| method | longest solved N | R | length N x R | solved (length@step) | steps | seconds |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for r in rows:
            print(f"| {METHODS[r['method']]} | {r['n']} | {r['r']} | {r['length']} | {' '.join(r['solved_at']) or '-'} "
                  f"| {r['steps']} | {r['seconds']} |")
        print()
    rows = [r for r in results if r["task"] == "char-lm"]
    if rows:
        base = next((r["test_bpc"] for r in rows if r["method"] == "bptt"), None)
        print(f"char LM (bytes of the standard library's sources, windows of {args.lm_seq_len}, embedding 32 + LSTM "
              f"{args.lm_hidden}; {args.lm_steps} steps; test bits per char on {args.lm_eval} held-out windows)\n")
        print("| method | test bits/char | vs truncated BPTT | seconds |")
        print("|---|---:|---:|---:|")
        for r in rows:
            rel = f"{r['test_bpc'] - base:+.3f}" if base is not None else "n/a"
            print(f"| {METHODS[r['method']]} | {r['test_bpc']:.3f} | {rel} | {r['seconds']} |")
        print()
    if args.plot:
        plot(results, args.plot, args)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

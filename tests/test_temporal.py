"""Tests for synthpipe.engine.temporal: truncated BPTT with temporal synthetic gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.temporal import StateLayout
from synthpipe.sequences import masked_bce

D, H, OUT = 4, 6, 3


class ElmanCell(nn.Module):
    """A user cell: loops over time itself; batch-first state (B, H)."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.inp, self.rec = nn.Linear(d, h), nn.Linear(h, h, bias=False)
        self.h = h

    def forward(self, x, state=None):
        h = x.new_zeros(x.shape[0], self.h) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            outs.append(h)
        return torch.stack(outs, 1), h


CORES = {
    "lstm": lambda: nn.LSTM(D, H, batch_first=True),
    "lstm2": lambda: nn.LSTM(D, H, num_layers=2, batch_first=True),
    "gru": lambda: nn.GRU(D, H, batch_first=True),
    "rnn": lambda: nn.RNN(D, H, batch_first=True),
    "cell": ElmanCell,
}


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return CORES[kind](), nn.Linear(H, OUT)


def _data(b=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, D, generator=g), torch.randint(0, 2, (b, length, OUT), generator=g).float()


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def _adam(p):
    return torch.optim.Adam(p, lr=0.05)


def _frozen(p):  # a synthesizer that is run and "trained" but stays exactly zero
    return torch.optim.SGD(p, lr=0.0)


class ZeroSynth(nn.Module):
    def forward(self, z):
        return torch.zeros_like(z)


@pytest.mark.parametrize("kind", list(CORES))
@pytest.mark.parametrize("synth", ["linear", "mlp", "module"])
def test_zero_synthesizer_equals_plain_truncated_bptt(kind, synth):
    T, steps = 3, 3
    core, head = _model(kind)
    ref_core, ref_head = copy.deepcopy(core), copy.deepcopy(head)
    synthesizer = ZeroSynth() if synth == "module" else sp.Synthesizer(synth)
    trainer = sp.TemporalTrainer(core, head, masked_bce, truncation=T, synthesizer=synthesizer,
                                 optimizer=_adam, synth_optimizer=_frozen)
    opt = _adam(list(ref_core.parameters()) + list(ref_head.parameters()))
    for s in range(steps):
        x, y = _data(length=8, seed=s)  # 8 = 3 + 3 + 2: the last chunk is shorter
        log = trainer.step(x, y)
        assert log.chunks == 3 and log.synth_loss is not None
        state = None  # plain truncated BPTT, written out
        for t0 in range(0, 8, T):
            out, state = ref_core(x[:, t0:t0 + T], None if state is None else _detach(state))
            loss = masked_bce(ref_head(out), y[:, t0:t0 + T])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert trainer.synthesizer is not None
    if synth == "linear":  # it was run and regressed, but its frozen output layer is still zero
        assert float(trainer.synthesizer.out.weight.detach().abs().max()) == 0
    for a, b in zip(_params(core, head), _params(ref_core, ref_head), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(_params(core, head), _params(*_model(kind)), strict=False))


def test_no_synthesizer_is_plain_truncated_bptt_and_reports_no_synth_loss():
    core, head = _model("lstm")
    ref = sp.TemporalTrainer(copy.deepcopy(core), copy.deepcopy(head), masked_bce, truncation=2,
                             synthesizer=ZeroSynth(), optimizer=_adam)
    plain = sp.TemporalTrainer(core, head, masked_bce, truncation=2, optimizer=_adam)
    x, y = _data()
    log = plain.step(x, y)
    ref.step(x, y)
    assert log.synth_loss is None and log.aux_loss is None and plain.synthesizer is None
    for a, b in zip(_params(core, head), _params(ref.core, ref.head), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _true_future_gradients(core, head, x, y, T, layout_dim):
    """Full BPTT over the chunks: (boundary z, B * dL_future/ds) per boundary, and the parameter gradients."""
    core, head = copy.deepcopy(core), copy.deepcopy(head)
    b, length = x.shape[:2]
    state, loss, boundaries = None, 0.0, []
    for t0 in range(0, length, T):
        out, state = core(x[:, t0:t0 + T], state)
        loss = loss + masked_bce(head(out), y[:, t0:t0 + T])
        if t0 + T < length:
            # a copy per boundary, so its gradient is the future's only (a cell's state may also be its output)
            parts = tuple(p.clone() for p in (state if isinstance(state, tuple) else (state,)))
            for p in parts:
                p.retain_grad()
            boundaries.append(parts)
            state = parts if isinstance(state, tuple) else parts[0]
    loss.backward()
    flat = lambda ts: torch.cat([t.movedim(layout_dim, 0).reshape(b, -1) for t in ts], 1)  # noqa: E731
    pairs = [(flat([p.detach() for p in parts]), b * flat([p.grad for p in parts])) for parts in boundaries]
    return pairs, [p.grad.clone() for p in list(core.parameters()) + list(head.parameters())]


class Oracle(nn.Module):
    """Returns the true future gradient of whichever boundary state it is shown."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs = pairs
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        for state, grad in self.pairs:
            if torch.allclose(state, z, rtol=0, atol=1e-6):
                return grad.clone()
        raise AssertionError("oracle shown a state that is no boundary of the full-BPTT run")


@pytest.mark.parametrize("kind, length", [("lstm", 6), ("lstm2", 9), ("gru", 6), ("cell", 9)])
def test_true_future_gradient_synthesizer_equals_full_bptt(kind, length):
    T, lr = 3, 0.1
    core, head = _model(kind)
    x, y = _data(length=length)
    pairs, full_grads = _true_future_gradients(core, head, x, y, T, 1 if kind != "cell" else 0)
    ref_core, ref_head = copy.deepcopy(core), copy.deepcopy(head)
    oracle = Oracle(pairs)
    trainer = sp.TemporalTrainer(core, head, masked_bce, truncation=T, synthesizer=oracle,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=lr), update="sequence")
    log = trainer.step(x, y)
    assert log.chunks == length // T and oracle.calls == 2 * (log.chunks - 1)  # inject + regress per boundary
    # the bootstrapped target (next chunk's gradient plus the oracle's own next prediction) is the truth
    assert log.synth_loss < 1e-10
    with torch.no_grad():  # one SGD step of full BPTT
        for p, g in zip(list(ref_core.parameters()) + list(ref_head.parameters()), full_grads, strict=False):
            p -= lr * g
    for a, b in zip(_params(core, head), _params(ref_core, ref_head), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and it is not plain truncated BPTT: the future gradient changed the first chunk's update
    plain_core, plain_head = copy.deepcopy(ref_core), copy.deepcopy(ref_head)
    plain_core.load_state_dict(_model(kind)[0].state_dict())
    plain_head.load_state_dict(_model(kind)[1].state_dict())
    plain = sp.TemporalTrainer(plain_core, plain_head, masked_bce, truncation=T,
                               optimizer=lambda p: torch.optim.SGD(p, lr=lr), update="sequence")
    plain.step(x, y)
    pairs = zip(_params(core, head), _params(plain_core, plain_head), strict=False)
    assert max(float((a - b).abs().max()) for a, b in pairs) > 1e-4


def test_synthesizer_regresses_on_the_per_example_true_gradient_at_the_last_boundary():
    # two chunks: the target at the one boundary is the last chunk's true gradient, times B
    core, head = _model("lstm")
    x, y = _data(b=4, length=6)
    (pairs, _) = _true_future_gradients(core, head, x, y, 3, 1)
    target = pairs[0][1]
    trainer = sp.TemporalTrainer(core, head, masked_bce, truncation=3, synthesizer=sp.Synthesizer("linear"),
                                 update="sequence")  # the core changes after the step, not between chunks
    log = trainer.step(x, y)
    assert log.synth_loss == pytest.approx(float(target.pow(2).mean()), rel=1e-5)
    assert trainer.synthesizer.out.weight.abs().sum() > 0  # and it was trained on it


def test_aux_future_predicts_the_synthetic_gradient_and_shapes_the_core():
    core, head = _model("lstm")
    x, y = _data(length=6)
    pairs, _ = _true_future_gradients(core, head, x, y, 3, 1)
    runs = {}
    for aux in (False, True):
        c, h = copy.deepcopy(core), copy.deepcopy(head)
        trainer = sp.TemporalTrainer(c, h, masked_bce, truncation=3, synthesizer=Oracle(pairs),
                                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), aux_future=aux,
                                     update="sequence")
        log = trainer.step(x, y)
        runs[aux] = (log, _params(c), trainer)
    log, _, trainer = runs[True]
    # the readout starts at zero, so its first loss is the mean square of the synthetic gradient
    assert log.aux_loss == pytest.approx(float(pairs[0][1].pow(2).mean()), rel=1e-5)
    assert runs[False][0].aux_loss is None
    assert trainer.aux_head is not None and trainer.aux_head.weight.abs().sum() > 0
    # the readout starts at zero, so the core feels the task from the second update on
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1], strict=False))
    for aux in (False, True):
        c, h = copy.deepcopy(core), copy.deepcopy(head)
        trainer = sp.TemporalTrainer(c, h, masked_bce, truncation=3, synthesizer=HalfState(),
                                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), aux_future=aux,
                                     aux_weight=100.0)
        trainer.fit([_data(length=6, seed=s) for s in range(2)])
        runs[aux] = _params(c)
    assert max(float((a - b).abs().max()) for a, b in zip(runs[True], runs[False], strict=False)) > 1e-6


class HalfState(nn.Module):
    """A fixed, non-zero synthesizer without parameters."""

    def forward(self, z):
        return 0.5 * z


def test_time_major_rnn_gets_time_major_inputs():
    core, head = _model("gru")
    tm = nn.GRU(D, H, batch_first=False)
    tm.load_state_dict(core.state_dict())
    x, _ = _data(length=7)
    a = sp.TemporalTrainer(core, head, masked_bce, truncation=3).predict(x)
    b = sp.TemporalTrainer(tm, head, masked_bce, truncation=3).predict(x)
    assert a.shape == (3, 7, OUT)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, head(core(x)[0]))  # chunked prediction carries the state


def test_state_layout_puts_the_batch_first_for_lstm_states():
    core = nn.LSTM(D, H, num_layers=2, batch_first=True)
    x, _ = _data(b=5)
    _, state = core(x)
    layout = StateLayout(state, 1, 5)
    assert layout.features == 2 * 2 * H
    z = layout.flatten(state, 5, x)
    perm = torch.tensor([4, 2, 0, 1, 3])
    _, state_p = core(x[perm])
    torch.testing.assert_close(layout.flatten(state_p, 5, x), z[perm])  # row i is example i
    back = layout.unflatten(z, state)
    assert all(torch.equal(a, b) for a, b in zip(back, state, strict=False))


class NoState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, H)

    def forward(self, x, state=None):
        return self.lin(x)


class NoneState(NoState):
    def forward(self, x, state=None):
        return self.lin(x), None


class LayersFirstCell(ElmanCell):
    """A user cell whose state is (layers, B, H), like nn.LSTM's."""

    def forward(self, x, state=None):
        out, h = super().forward(x, None if state is None else state[0])
        return out, h[None]


def test_state_batch_dimension_is_checked_and_can_be_named():
    x, y = _data(b=3)
    trainer = sp.TemporalTrainer(LayersFirstCell(), nn.Linear(H, OUT), masked_bce, truncation=2,
                                 synthesizer=sp.Synthesizer("linear"))
    with pytest.raises(ValueError, match=r"state tensor 0 has shape \(1, 3, 6\).*batch dimension 0.*state_batch_dim"):
        trainer.step(x, y)
    trainer = sp.TemporalTrainer(LayersFirstCell(), nn.Linear(H, OUT), masked_bce, truncation=2,
                                 synthesizer=sp.Synthesizer("linear"), state_batch_dim=1)
    assert trainer.step(x, y).chunks == 4
    with pytest.raises(ValueError, match="batch dimension 1"):
        sp.TemporalTrainer(ElmanCell(), nn.Linear(H, OUT), masked_bce, truncation=2, state_batch_dim=1).step(x, y)


@pytest.mark.parametrize("make, match", [
    (lambda: sp.TemporalTrainer(nn.Linear(D, H), nn.Linear(H, OUT), masked_bce, truncation=2), "takes no state"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H, bidirectional=True), nn.Linear(H, OUT), masked_bce, truncation=2),
     "bidirectional"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=0), "truncation"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=-3), "truncation"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=2.0), "truncation"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=True), "truncation"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=2,
                                synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=3)), "conditional"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=2,
                                synthesizer=sp.Synthesizer("conv")), "conv"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=2, aux_future=True),
     "aux_future"),
    (lambda: sp.TemporalTrainer(nn.LSTM(D, H), nn.Linear(H, OUT), masked_bce, truncation=2, update="epoch"),
     "update"),
])
def test_bad_options_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_optimizer_instance_is_refused_as_not_a_factory():
    core = nn.LSTM(D, H)
    with pytest.raises(TypeError, match="optimizer must be a factory"):
        sp.TemporalTrainer(core, nn.Linear(H, OUT), masked_bce, truncation=2,
                           optimizer=torch.optim.SGD(core.parameters(), lr=0.1))


@pytest.mark.parametrize("core, synth, x_y, match", [
    (NoState(), None, None, "returned a torch.float32 tensor.*returns \\(output, new_state\\)"),
    (NoneState(), None, None, r"returned no state \(None\)"),
    (None, None, (torch.zeros(3, 7, D), torch.zeros(2, 7, OUT)), "do not fit inputs"),
    (None, None, (torch.zeros(3, 7, D), torch.zeros(3, 6, OUT)), "do not fit inputs"),
    (None, None, (torch.zeros(7), torch.zeros(7)), "batch-first"),
    (None, None, (torch.zeros(7, D), torch.zeros(7, D)), r"needs batch-first inputs \(B, L, 4\), got shape \(7, 4\)"),
    (None, None, (torch.zeros(3, 7, D + 1), torch.zeros(3, 7, OUT)), r"input_size=4"),
    (None, nn.Linear(2 * H, H), None, "must return the same shape"),
])
def test_bad_cores_and_batches_are_refused_by_name(core, synth, x_y, match):
    core = core if core is not None else nn.LSTM(D, H, batch_first=True)
    trainer = sp.TemporalTrainer(core, nn.Linear(H, OUT), masked_bce, truncation=2, synthesizer=synth)
    before = _params(core)
    with pytest.raises(ValueError, match=match):
        trainer.step(*(x_y or _data()))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(core), strict=False))  # nothing was trained


def _copy_error(synthesizer, seed: int) -> float:
    """Copy 3 patterns of 4 bits (length 7) at T = 2: no pattern and its copy share a chunk."""
    from synthpipe.sequences import CopyTask, bits_per_step
    torch.manual_seed(seed)
    core, head = nn.LSTM(5, 64, batch_first=True), nn.Linear(64, 4)
    adam = (lambda p: torch.optim.Adam(p, lr=3e-3))  # noqa: E731
    trainer = sp.TemporalTrainer(core, head, masked_bce, truncation=2, synthesizer=synthesizer,
                                 optimizer=adam, synth_optimizer=adam, synthetic_scale=0.1)
    trainer.fit(CopyTask(3, batch_size=32, bits=4, seed=seed), steps=600)
    x, y = CopyTask(3, batch_size=256, bits=4).batch(torch.Generator().manual_seed(99))
    return bits_per_step(trainer.predict(x), y)


def test_synthetic_gradient_learns_a_copy_task_longer_than_the_truncation():
    # Offline over seeds 0-5 (same sizes): truncated BPTT 2.8-3.5 bits per step (4 = chance),
    # DNI 1.4-1.7, a ratio of 0.44-0.55; the bound leaves a wide margin.
    plain, dni = _copy_error(None, seed=0), _copy_error(sp.Synthesizer("linear"), seed=0)
    assert dni < 0.75 * plain, (plain, dni)


class LastOutputCell(ElmanCell):
    """A cell whose output is the last step only, (B, H): nothing per step for the aux readout."""

    def forward(self, x, state=None):
        out, h = super().forward(x, state)
        return out[:, -1], h


def test_a_refused_first_step_leaves_the_trainer_unbuilt():
    trainer = sp.TemporalTrainer(LastOutputCell(), nn.Linear(H, OUT), masked_bce, truncation=2,
                                 synthesizer=sp.Synthesizer("linear"), aux_future=True)
    with pytest.raises(ValueError, match=r"aux_future reads the core's output per step.*\(3, 6\)"):
        trainer.step(*_data())
    assert trainer.layout is None and trainer.synthesizer is None and trainer.aux_head is None
    assert len(trainer.optimizer.param_groups) == 1

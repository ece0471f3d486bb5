"""Checkpoints (engine/checkpoint.py): save, resume, export, in one process and across ranks."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.checkpoint import export_checkpoint, read_meta

from multiprocess import run_ranks
from reference import assert_states_close

pytestmark = pytest.mark.timeout(180)

OPTIONS = {"gradients": "synthetic", "delay": 1, "synth_lr": 1e-2,
           "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=5)}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.BatchNorm1d(24),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))


def make_batches(n: int = 10) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def trainer(n_stages: int = 3) -> sp.Trainer:
    return sp.Trainer(sp.split(make_model(), n_stages=n_stages), nn.CrossEntropyLoss(),
                      lambda p: torch.optim.Adam(p, lr=1e-2), progress=False, **OPTIONS)


def everything(t: sp.Trainer) -> dict:
    """Stage modules, optimizers and synthesizers of this process, flattened to tensors."""
    stages = t.runner.stages if hasattr(t.runner, "stages") else [t.runner.stage]
    out = {}
    for s in stages:
        out.update({f"{s.index}/module/{k}": v.clone() for k, v in s.module.state_dict().items()})
        if s.synth is not None:
            out.update({f"{s.index}/synth/{k}": v.clone() for k, v in s.synth.state_dict().items()})
        for i, st in enumerate(s.optimizer.state_dict()["state"].values()):
            out.update({f"{s.index}/opt/{i}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def assert_equal(a: dict, b: dict) -> None:
    assert_states_close(a, b, atol=1e-6)


def resume_across_ranks(rank: int, directory: str, batches: list) -> dict:
    first = trainer()
    first.fit(batches, max_steps=5)
    first.save(directory)
    resumed = trainer()  # a new trainer in the same processes (the group stays up)
    history = resumed.fit(batches, max_steps=10, resume=directory)
    result = {"state": everything(resumed), "steps": [s["step"] for s in history.steps]}
    resumed.export(directory + "/model.pt")
    resumed.close()
    return result


def straight_through(rank: int, batches: list) -> dict:
    t = trainer()
    t.fit(batches, max_steps=10)
    result = {"state": everything(t)}
    t.close()
    return result


def test_resume_across_ranks_equals_one_uninterrupted_run_and_export_loads(tmp_path):
    batches = make_batches()
    directory = str(tmp_path / "ckpt")
    resumed = run_ranks(resume_across_ranks, 3, directory, batches)
    straight = run_ranks(straight_through, 3, batches)
    for r in range(3):
        assert_equal(resumed[r]["state"], straight[r]["state"])
        assert resumed[r]["steps"] == list(range(5, 10))
    assert read_meta(directory)["step"] == 5

    model = make_model()
    model.load_state_dict(torch.load(directory + "/model.pt"))  # strict: original names, no synthesizers
    single = trainer()
    single.fit(batches, max_steps=10)
    for k, v in single.state_dict().items():
        assert torch.allclose(model.state_dict()[k].float(), v.float(), atol=1e-6), k


def test_single_process_resume_and_checkpoint_export(tmp_path):
    batches = make_batches()
    straight = trainer()
    straight.fit(batches, max_steps=10)
    first = trainer()
    first.fit(batches, max_steps=4)
    first.save(str(tmp_path))
    again = trainer().load(str(tmp_path))
    assert again.step == 4 and again.step_in_epoch == 4
    again.fit(batches, max_steps=10)
    assert_equal(everything(again), everything(straight))

    exported = export_checkpoint(str(tmp_path), str(tmp_path / "m.pt"))
    model = make_model()
    model.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert set(exported) == set(model.state_dict())


def test_resume_continues_the_epoch_where_it_stopped(tmp_path):
    batches = make_batches(n=6)
    first = trainer(2)
    first.fit(batches, epochs=2, max_steps=8)
    assert (first.epoch, first.step_in_epoch) == (1, 2)
    first.save(str(tmp_path))
    history = trainer(2).fit(batches, epochs=2, resume=str(tmp_path))
    assert [(s["step"], s["epoch"]) for s in history.steps] == [(8, 1), (9, 1), (10, 1), (11, 1)]


def test_loading_an_incomplete_or_mismatched_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete synthpipe checkpoint"):
        trainer().load(str(tmp_path))
    two = trainer(2)
    two.fit(make_batches(2))
    two.save(str(tmp_path))
    with pytest.raises(ValueError, match="has 2 stages, this trainer has 3"):
        trainer(3).load(str(tmp_path))


def other_trainer(balance: list, optimizer=None, synthesizer=None) -> sp.Trainer:
    options = dict(OPTIONS, synthesizer=synthesizer or OPTIONS["synthesizer"])
    return sp.Trainer(sp.split(make_model(), balance=balance), nn.CrossEntropyLoss(),
                      optimizer or (lambda p: torch.optim.Adam(p, lr=1e-2)), progress=False, **options)


@pytest.mark.parametrize("load_into, message", [
    (lambda: other_trainer([2, 4, 2]), r"stage 0: the checkpoint's stage 0 has 2\.weight, 2\.bias besides: "
                                        r"the model was split differently"),
    (lambda: other_trainer([3, 3, 2], optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
     "saved with torch.optim.adam.Adam, this trainer uses torch.optim.sgd.SGD"),
    (lambda: other_trainer([3, 3, 2], synthesizer=sp.Synthesizer("mlp", conditional=True, num_classes=5)),
     "stage 0: the checkpoint's synthesizer does not fit"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_loaded(tmp_path, load_into, message):
    saved = other_trainer([3, 3, 2])
    assert [len(s.module) for s in saved.runner.stages] == [3, 3, 2]
    saved.fit(make_batches(4))
    saved.save(str(tmp_path))
    target = load_into()
    target.fit(make_batches(2))
    before, step = everything(target), target.step
    with pytest.raises(ValueError, match=message):
        target.load(str(tmp_path))
    # Every stage was checked before any was loaded: the trainer is exactly as it was.
    assert_equal(everything(target), before) and target.step == step


def test_loading_a_checkpoint_saved_before_training_drops_the_synthesizers_trained_since(tmp_path):
    t = trainer()
    t.save(str(tmp_path))  # step 0: no synthesizer exists yet
    t.fit(make_batches(4))
    assert t.runner.stages[0].synth is not None
    t.load(str(tmp_path))
    assert [s.synth for s in t.runner.stages] == [None, None, None]
    t.fit(make_batches(4))
    fresh = trainer()
    fresh.fit(make_batches(4))
    assert_equal(everything(t), everything(fresh))


def load_checkpoints_that_do_not_fit(rank: int, directory: str, batches: list) -> dict:
    t = trainer(2)
    assert [len(s) for s in sp.split(make_model(), n_stages=2)] == [5, 3]  # (whole layers)
    t.fit(batches, max_steps=3)
    t.save(directory)
    errors = []
    other = sp.Trainer(sp.split(make_model(), balance=[3, 5]), nn.CrossEntropyLoss(),
                       lambda p: torch.optim.Adam(p, lr=1e-2), progress=False, **OPTIONS)
    other_before = everything(other)
    try:
        other.load(directory)  # split differently: every rank's part is refused
        errors.append("no error")
    except ValueError as e:
        errors.append(f"{type(e).__name__}: {e}")
    other_untouched = everything(other)
    other.close()
    t.fit(batches, max_steps=5)
    trained = everything(t)
    if rank == 1:  # one rank's file is gone (a host that lost it): rank 0 has what it needs
        os.rename(os.path.join(directory, "stage-1-3.pt"), os.path.join(directory, "moved.pt"))
    try:
        t.load(directory)
        errors.append("no error")
    except (ValueError, FileNotFoundError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    untouched = everything(t)
    if rank == 1:
        os.rename(os.path.join(directory, "moved.pt"), os.path.join(directory, "stage-1-3.pt"))
    t.load(directory)  # the same trainers and group go on working
    t.fit(batches, max_steps=5)
    result = {"errors": errors, "other_before": other_before, "other_untouched": other_untouched,
              "trained": trained, "untouched": untouched, "reloaded_and_trained": everything(t), "step": t.step}
    t.close()
    return result


def test_a_checkpoint_that_does_not_fit_some_rank_is_an_error_on_every_rank_and_loads_nowhere(tmp_path):
    directory = str(tmp_path / "ckpt")
    results = run_ranks(load_checkpoints_that_do_not_fit, 2, directory, make_batches(), timeout=120)
    for rank, r in enumerate(results):
        split, missing_file = r["errors"]
        own_file = os.path.join(directory, f"stage-{rank}-3.pt")
        assert split.startswith(f"CheckpointError: rank {rank} cannot load stage {rank}'s file {own_file}: "
                                f"stage {rank}: the checkpoint's stage {rank} ") and "split differently" in split, split
        assert_equal(r["other_untouched"], r["other_before"])
        assert_equal(r["untouched"], r["trained"])  # rank 0 could have loaded its part, and did not
        assert_equal(r["reloaded_and_trained"], r["trained"]) and r["step"] == 5
    assert results[1]["errors"][1].startswith("FileNotFoundError: ") and "stage-1-3.pt" in results[1]["errors"][1]
    assert results[0]["errors"][1].startswith(
        "ValueError: the checkpoint was not loaded on any rank: rank 1: FileNotFoundError: "), results[0]["errors"][1]


@pytest.mark.parametrize("text, message", [("", "is corrupt \\(JSONDecodeError"),
                                           ("[1, 2]", "is corrupt: it holds a JSON list"),
                                           ('{"epoch": 0}', "is corrupt: it has no step, step_in_epoch, n_stages")])
def test_a_corrupt_meta_file_is_named(tmp_path, text, message):
    (tmp_path / "meta.json").write_text(text)
    t = trainer()
    with pytest.raises(ValueError, match=str(tmp_path / "meta.json").replace(".", "\\.") + " " + message):
        t.load(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        export_checkpoint(str(tmp_path), str(tmp_path / "model.pt"))


def test_resume_with_a_shuffled_loader_sees_the_same_order(tmp_path):
    from synthpipe import data
    dataset = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*make_batches(6), strict=True)])
    straight = trainer(2)
    straight.fit(data.loader(dataset, 16, shuffle=True, seed=5), epochs=3)
    first = trainer(2)
    first.fit(data.loader(dataset, 16, shuffle=True, seed=5), epochs=3, max_steps=9)  # stops inside epoch 1
    first.save(str(tmp_path))
    resumed = trainer(2)
    resumed.fit(data.loader(dataset, 16, shuffle=True, seed=5), epochs=3, resume=str(tmp_path))
    assert resumed.step == straight.step == 18
    assert_equal(everything(resumed), everything(straight))


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):

    import synthpipe.engine.checkpoint as ckpt

    directory = str(tmp_path)
    batches = make_batches()
    t = trainer()
    t.fit(batches, max_steps=4)
    t.save(directory)
    at_4 = everything(t)
    t.fit(batches, max_steps=8)

    def die(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "write_meta", die)  # every stage file of step 8 is written, meta.json is not
    with pytest.raises(OSError, match="disk full"):
        t.save(directory)
    monkeypatch.undo()
    assert read_meta(directory)["step"] == 4
    restored = trainer().load(directory)
    assert restored.step == 4
    assert_equal(everything(restored), at_4)

    t.save(directory)  # a save that completes replaces it, and removes step 4's files
    assert sorted(os.listdir(directory)) == ["meta.json", "stage-0-8.pt", "stage-1-8.pt", "stage-2-8.pt"]
    assert_equal(everything(trainer().load(directory)), everything(t))


def downgrade(directory: str, version: int) -> None:
    """Rewrite a checkpoint as synthpipe wrote it at ``version`` (1-3): no sizes or checksums
    in meta.json, the NumPy and Python RNG states as the tuples those versions pickled, and
    (version 1) files named ``stage-<r>.pt``."""
    import json

    import numpy as np

    from synthpipe.engine.checkpoint import saved_stage_file

    meta = read_meta(directory)
    for r in range(meta["n_stages"]):
        path = saved_stage_file(directory, meta, r)
        state = torch.load(path, weights_only=True)
        rng = state["rng"]
        n, p = rng["numpy"], rng["python"]
        rng["numpy"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        rng["python"] = (p["version"], tuple(p["state"].tolist()), p["gauss_next"])
        torch.save(state, path)
        if version == 1:
            os.replace(path, os.path.join(directory, f"stage-{r}.pt"))
    meta["version"] = version
    del meta["files"]
    if version < 3:
        del meta["suffix"]
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_checkpoint_of_an_earlier_version_still_loads_with_its_rng_state(tmp_path, version):
    import random

    import numpy as np

    t = trainer(2)
    t.fit(make_batches(), max_steps=3)
    t.save(str(tmp_path))
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    downgrade(str(tmp_path), version)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    loaded = trainer(2).load(str(tmp_path))
    assert_equal(everything(loaded), everything(t))
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    name = "stage-1.pt" if version == 1 else "stage-1-3.pt"
    os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="step 3.*stage-1-3.pt"):
        trainer(2).load(str(tmp_path))


def test_a_damaged_file_of_an_earlier_version_is_named_with_the_version(tmp_path):
    t = trainer(2)
    t.fit(make_batches(), max_steps=3)
    t.save(str(tmp_path))
    downgrade(str(tmp_path), 3)
    path = tmp_path / "stage-1-3.pt"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot load stage 1's file {path} \\(checkpoint version 3\\): the file is "
                                         f"truncated \\(a zip archive, as torch.save writes, without its end\\)"):
        trainer(2).load(str(tmp_path))


def test_a_checkpoint_of_a_newer_version_is_refused_by_number(tmp_path):
    import json

    t = trainer(2)
    t.save(str(tmp_path))
    meta = read_meta(str(tmp_path))
    meta["version"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is of version 99, written by a newer synthpipe; this one reads "
                                         "versions 1 to 4"):
        trainer(2).load(str(tmp_path))


def test_meta_json_records_every_stage_file_by_size_and_sha256(tmp_path):
    import hashlib

    t = trainer()
    t.fit(make_batches(), max_steps=2)
    t.save(str(tmp_path))
    meta = read_meta(str(tmp_path))
    assert meta["version"] == 4 and sorted(meta["files"]) == ["0", "1", "2"]
    for r, record in meta["files"].items():
        data = (tmp_path / record["name"]).read_bytes()
        assert record == {"name": f"stage-{r}-2.pt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        torch.load(tmp_path / record["name"], weights_only=True)  # plain data only


def flip_a_byte_in_the_middle(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, what", [
    (lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "the file is corrupt: its sha256 is"),
    (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), "the file is truncated: it has"),
    (flip_a_byte_in_the_middle, "the file is corrupt: its sha256 is"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "the file is not the one that was saved"),
])
def test_a_damaged_stage_file_is_found_before_unpickling_and_named(tmp_path, monkeypatch, damage, what):
    t = trainer()
    t.fit(make_batches(), max_steps=2)
    t.save(str(tmp_path))
    damage(tmp_path / "stage-1-2.pt")
    fresh = trainer()
    before = everything(fresh)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: loads.append(os.path.basename(path)) or
                        real_load(path, *a, **k))
    with pytest.raises(ValueError, match=f"cannot load stage 1's file {tmp_path / 'stage-1-2.pt'} "
                                         f"\\(checkpoint version 4\\): {what}"):
        fresh.load(str(tmp_path))
    assert "stage-1-2.pt" not in loads  # (a flipped byte in a tensor would have loaded without complaint)
    assert_equal(everything(fresh), before) and fresh.step == 0


class RunsCode:
    """Unpickling this writes a marker file: what a checkpoint from a stranger could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_stage_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    import hashlib
    import json

    t = trainer(2)
    t.save(str(tmp_path))
    marker = str(tmp_path / "ran")
    path = tmp_path / "stage-1-0.pt"
    state = torch.load(path, weights_only=True)
    state["stage"]["payload"] = RunsCode(marker)
    torch.save(state, path)
    meta = read_meta(str(tmp_path))  # whoever made the file made its meta.json too
    data = path.read_bytes()
    meta["files"]["1"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds a io.open, which is not plain data, so it is not loaded"):
        trainer(2).load(str(tmp_path))
    assert not os.path.exists(marker)


def test_a_state_that_is_not_plain_data_is_refused_before_anything_is_written(tmp_path):
    t = trainer(2)
    t.fit(make_batches(), max_steps=2)
    t.runner.stages[1].optimizer.param_groups[0]["schedule"] = RunsCode("unused")
    with pytest.raises(TypeError, match=r"stage 1's state cannot be checkpointed: stage 1's state\['stage'\]"
                                        r"\['optimizer'\]\['param_groups'\]\[0\]\['schedule'\] is a "
                                        r"test_checkpoint.RunsCode"):
        t.save(str(tmp_path / "ck"))
    assert not os.path.exists(tmp_path / "ck" / "meta.json")


def load_a_damaged_file(rank: int, directory: str, damage: str) -> str:
    t = trainer(2)
    t.fit(make_batches(), max_steps=3)
    t.save(directory)
    if rank == 1:
        path = os.path.join(directory, "stage-1-3.pt")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(os.urandom(len(data)) if damage == "random" else data[:len(data) // 2])
    t._agree("damaged")  # (rank 0 loads only once rank 1 has damaged its file)
    try:
        t.load(directory)
        message = "no error"
    except ValueError as e:
        message = f"{type(e).__name__}: {e}"
    t.close()
    return message


@pytest.mark.parametrize("damage, what", [("random", "the file is corrupt: its sha256 is"),
                                          ("truncated", "the file is truncated: it has")])
def test_a_damaged_file_on_one_rank_is_an_error_naming_it_on_every_rank(tmp_path, damage, what):
    directory = str(tmp_path / "ckpt")
    messages = run_ranks(load_a_damaged_file, 2, directory, damage, timeout=120)
    named = f"rank 1 cannot load stage 1's file {directory}/stage-1-3.pt (checkpoint version 4): {what}"
    assert messages[1].startswith(f"CheckpointError: {named}"), messages[1]
    assert messages[0].startswith(f"ValueError: the checkpoint was not loaded on any rank: rank 1: CheckpointError: "
                                  f"{named}"), messages[0]


def test_periodic_checkpoints_train_exactly_as_one_fit(tmp_path):

    batches = make_batches(n=10)
    straight = trainer()
    straight_history = straight.fit(batches, epochs=2)
    periodic = trainer()
    history = periodic.fit(batches, epochs=2, checkpoint=str(tmp_path), checkpoint_every=3)
    assert_equal(everything(periodic), everything(straight))
    assert [s["step"] for s in history.steps] == list(range(20))
    # the epoch records span the checkpoints (steps 3, 6, 9 fall inside epoch 0)
    assert [(e["epoch"], e["steps"], e["samples"]) for e in history.epochs] == [(0, 10, 160), (1, 10, 160)]
    assert [e["steps"] for e in straight_history.epochs] == [10, 10]
    assert read_meta(str(tmp_path))["step"] == 20  # the last save is the end of training
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "stage-0-20.pt", "stage-1-20.pt", "stage-2-20.pt"]


class FailingBatches:
    """The batches, but the loader fails when asked for batch ``fail_at`` (a crash mid-run)."""

    def __init__(self, batches: list, fail_at: int):
        self.batches, self.fail_at = batches, fail_at

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_at:
                raise RuntimeError("the data server went away")
            yield b


def test_a_run_that_dies_loses_only_the_steps_since_the_last_periodic_checkpoint(tmp_path):
    batches = make_batches(n=10)
    straight = trainer()
    straight.fit(batches, max_steps=10)
    dying = trainer()
    with pytest.raises(RuntimeError, match="data server"):
        dying.fit(FailingBatches(batches, fail_at=7), max_steps=10, checkpoint=str(tmp_path), checkpoint_every=3)
    assert read_meta(str(tmp_path))["step"] == 6  # saved at 3 and 6; steps 6..7 were lost
    resumed = trainer()
    history = resumed.fit(batches, max_steps=10, resume=str(tmp_path))
    assert [s["step"] for s in history.steps] == [6, 7, 8, 9]
    assert_equal(everything(resumed), everything(straight))


def test_periodic_checkpoint_arguments_are_checked():
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        trainer().fit(make_batches(2), checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        trainer().fit(make_batches(2), checkpoint="unused", checkpoint_every=0)


def periodic_across_ranks(rank: int, directory: str, batches: list) -> dict:
    t = trainer()
    history = t.fit(batches, max_steps=10, checkpoint=directory, checkpoint_every=4)
    straight = trainer()  # the reference, in the same processes
    straight.fit(batches, max_steps=10)
    result = {"state": everything(t), "straight": everything(straight), "steps": [s["step"] for s in history.steps],
              "step": t.step}
    t.close()
    straight.close()
    return result


def test_periodic_checkpoints_across_ranks_equal_one_uninterrupted_run(tmp_path):
    directory = str(tmp_path / "ckpt")
    for r, result in enumerate(run_ranks(periodic_across_ranks, 3, directory, make_batches())):
        assert_equal(result["state"], result["straight"])
        assert result["steps"] == list(range(10)) and result["step"] == 10, r
    assert read_meta(directory)["step"] == 10


def mismatched_fit_plans(rank: int, directory: str, batches: list) -> dict:
    """Two fits whose checkpoint plans differ between the ranks, then the right one."""
    import time

    t = trainer(2)
    before = everything(t)
    errors, seconds = [], []
    for kwargs in ({"checkpoint": directory} if rank == 0 else {},  # "only rank 0 saves": a DDP habit
                   {"checkpoint": directory, "checkpoint_every": 4 if rank == 0 else 5}):
        start = time.monotonic()
        try:
            t.fit(batches, max_steps=10, **kwargs)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
        seconds.append(time.monotonic() - start)
    untouched = everything(t)
    t.fit(batches, max_steps=10, checkpoint=directory, checkpoint_every=4)
    straight = trainer(2)
    straight.fit(batches, max_steps=10)
    result = {"errors": errors, "seconds": seconds, "before": before, "untouched": untouched,
              "state": everything(t), "straight": everything(straight), "step": t.step}
    t.close()
    straight.close()
    return result


def test_ranks_with_different_checkpoint_plans_fail_at_once_and_keep_their_state(tmp_path):
    # Before, a checkpoint on rank 0 only died in a barrier ("Connection closed by peer") and
    # a different checkpoint_every waited forever.
    directory = str(tmp_path / "ckpt")
    results = run_ranks(mismatched_fit_plans, 2, directory, make_batches(), timeout=120)
    for r in results:
        only_rank_0, every = r["errors"]
        assert "rank 0 called fit(checkpoint=...); rank 1 called fit()" in only_rank_0, only_rank_0
        assert ("rank 0 called fit(checkpoint=..., checkpoint_every=4); "
                "rank 1 called fit(checkpoint=..., checkpoint_every=5)") in every, every
        assert "call them on every rank" in every
        assert max(r["seconds"]) < 20  # well within the failure timeout: nothing was waited for
        assert_equal(r["untouched"], r["before"])  # nothing trained, nothing saved
        assert_equal(r["state"], r["straight"]) and r["step"] == 10  # and the trainer still works
    assert read_meta(directory)["step"] == 10


def save_on_rank_0_only(rank: int, directory: str, batches: list) -> dict:
    t = trainer(2)
    t.fit(batches, max_steps=4)
    try:
        if rank == 0:
            t.save(directory)
        else:
            t.close()
        error = "no error"
    except ValueError as e:
        error = str(e)
    saved_early = os.path.exists(directory)
    t.save(directory)  # what was meant: every rank saves, then closes
    t.close()
    return {"error": error, "saved_early": saved_early}


def test_save_called_on_one_rank_only_is_an_error_on_every_rank_not_a_hang(tmp_path):
    directory = str(tmp_path / "ckpt")
    for r in run_ranks(save_on_rank_0_only, 2, directory, make_batches(), timeout=120):
        assert "rank 0 called save(); rank 1 called close()" in r["error"], r["error"]
        assert not r["saved_early"]
    assert read_meta(directory)["step"] == 4


class SignallingBatches:
    """The batches; at batch ``at`` the loader sends ``signum`` (default SIGTERM: a scheduler
    stopping the job) to ``pid`` and from then on takes ``delay`` seconds per batch, so the
    run is still going when the request arrives. Batches listed in ``again`` send it once
    more, once ``handled()`` says the first was taken (two signals sent at once may arrive as
    one). It refuses to signal this process without a handler of the fit's making (that
    would kill the test run) by raising instead."""

    def __init__(self, batches: list, at: int, pid: int, delay: float = 0.0, signum: int | None = None,
                 again: tuple = (), handled: Any = None):
        import signal

        self.batches, self.at, self.pid, self.delay, self.again = batches, at, pid, delay, again
        self.handled = handled
        self.signum = signal.SIGTERM if signum is None else signum

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        import signal
        import time

        def send() -> None:
            if self.pid == os.getpid() and signal.getsignal(self.signum) in (signal.SIG_DFL,
                                                                              signal.default_int_handler):
                raise AssertionError(f"fit installed no {signal.Signals(self.signum).name} handler")
            os.kill(self.pid, self.signum)

        for i, b in enumerate(self.batches):
            if i == self.at:
                send()
            if i in self.again:
                deadline = time.monotonic() + 10
                while not self.handled() and time.monotonic() < deadline:
                    time.sleep(0.01)
                send()
            if i >= self.at:
                time.sleep(self.delay)
            yield b


@pytest.mark.parametrize("every", [None, 1])  # 1: a save after every step, the stop still gets through
def test_sigterm_stops_the_run_with_a_checkpoint_that_resumes_exactly(tmp_path, every):
    import signal

    batches = make_batches(n=40)
    t = trainer()
    history = t.fit(SignallingBatches(batches, at=5, pid=os.getpid(), delay=0.01), max_steps=40,
                    checkpoint=str(tmp_path), checkpoint_every=every)
    s = t.step
    assert t.stopped == "SIGTERM on rank 0"
    assert 0 < s < 40 and [x["step"] for x in history.steps] == list(range(s))  # (the loader reads ahead)
    assert read_meta(str(tmp_path))["step"] == s
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the fit's handler is gone
    straight = trainer()
    straight.fit(batches, max_steps=40)
    resumed = trainer()
    resumed.fit(batches, max_steps=40, resume=str(tmp_path))
    assert resumed.stopped is None and resumed.step == 40
    assert_equal(everything(resumed), everything(straight))


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_that_comes_during_the_last_save_is_acted_on_after_it(tmp_path, monkeypatch, name):
    import signal

    signum = signal.Signals[name]
    t = trainer()
    save = t.save

    def save_and_get_signalled(directory):
        save(directory)
        signal.raise_signal(signum)  # the fit's handler takes it: the loop is over already
    monkeypatch.setattr(t, "save", save_and_get_signalled)
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))  # (not this test run)
    if signum == signal.SIGINT:  # then Ctrl-C has its usual effect
        with pytest.raises(KeyboardInterrupt):
            t.fit(make_batches(4), checkpoint=str(tmp_path))
        assert killed == []
    else:  # then SIGTERM gets its default action
        t.fit(make_batches(4), checkpoint=str(tmp_path))
        assert killed == [(os.getpid(), signal.SIGTERM)]
    assert t.stopped is None and t.step == 4  # the run completed
    assert read_meta(str(tmp_path))["step"] == 4  # and was saved


def test_ctrl_c_stops_the_run_like_sigterm_and_says_so(tmp_path, capfd):
    import signal

    batches = make_batches(n=40)
    t = trainer()
    t.fit(SignallingBatches(batches, at=5, pid=os.getpid(), delay=0.01, signum=signal.SIGINT), max_steps=40,
          checkpoint=str(tmp_path))
    s = t.step
    assert t.stopped == "SIGINT on rank 0" and 0 < s < 40
    assert read_meta(str(tmp_path))["step"] == s
    assert "press Ctrl-C again to stop at once" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is normal again
    straight = trainer()
    straight.fit(batches, max_steps=s)
    assert_equal(everything(t), everything(straight))  # as if max_steps had been s


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    import signal

    batches = make_batches(n=40)
    t = trainer()
    t.fit(batches, max_steps=3, checkpoint=str(tmp_path))  # a complete checkpoint at step 3
    # The first Ctrl-C asks for a stop; a second one comes while that batch is still being read, so
    # before the fit is over (the loader runs on the prefetch thread, which the stop waits for).
    loader = SignallingBatches(batches, at=4, pid=os.getpid(), signum=signal.SIGINT, again=(4,),
                               handled=lambda: t._signals.here is not None)
    with pytest.raises(KeyboardInterrupt):
        t.fit(loader, max_steps=40, checkpoint=str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert read_meta(str(tmp_path))["step"] == 3  # no save was made on the way out; the last one is whole
    resumed = trainer()
    with pytest.warns(RuntimeWarning, match="trains nothing"):  # the checkpoint is at step 3 already
        resumed.fit(batches, max_steps=3, resume=str(tmp_path))
    assert resumed.step == 3


def test_without_a_checkpoint_sigterm_and_ctrl_c_are_left_alone():
    import signal

    seen = []

    class Watching(list):
        def __init__(self, batches):
            super().__init__(batches)
            self.interrupt = []

        def __iter__(self):
            for b in super().__iter__():
                seen.append(signal.getsignal(signal.SIGTERM))
                self.interrupt.append(signal.getsignal(signal.SIGINT))
                yield b
    batches = Watching(make_batches(3))
    trainer().fit(batches)
    assert seen and all(h is signal.SIG_DFL for h in seen)
    assert all(h is signal.default_int_handler for h in batches.interrupt)  # Ctrl-C raises as usual


def test_an_ignored_ctrl_c_stays_ignored_with_a_checkpoint(tmp_path):
    # A job started with SIGINT ignored (in the background, under nohup) keeps it so.
    import signal

    class Watching(list):
        def __iter__(self):
            for b in super().__iter__():
                seen.append(signal.getsignal(signal.SIGINT))
                yield b
    seen: list = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        t = trainer()
        t.fit(Watching(make_batches(3)), checkpoint=str(tmp_path))
        assert seen and all(h is signal.SIG_IGN for h in seen)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert t.stopped is None
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_across_ranks(rank: int, directory: str, batches: list) -> dict:

    import torch.distributed as dist

    t = trainer(2)
    pids: list = [None, None]
    dist.all_gather_object(pids, os.getpid())
    loader = SignallingBatches(batches, at=5, pid=pids[1], delay=0.02)  # the signal goes to rank 1
    history = t.fit(loader if rank == 0 else None, max_steps=len(batches), checkpoint=directory)
    result = {"stopped": t.stopped, "step": t.step, "steps": [s["step"] for s in history.steps],
              "state": everything(t)}
    straight = trainer(2)
    straight.fit(batches if rank == 0 else None, max_steps=t.step)
    result["straight"] = everything(straight)
    t.close()
    straight.close()
    return result


def test_sigterm_on_another_rank_stops_the_pipeline_and_every_rank_saves(tmp_path):
    batches = make_batches(n=400)
    directory = str(tmp_path / "ckpt")
    results = run_ranks(stop_across_ranks, 2, directory, batches)
    s = results[0]["step"]
    assert 0 < s < 400
    for r in range(2):
        assert results[r]["stopped"] == "SIGTERM on rank 1"
        assert results[r]["step"] == s and results[r]["steps"] == list(range(s))
        assert_equal(results[r]["state"], results[r]["straight"])  # as if max_steps had been s
    assert read_meta(directory)["step"] == s


def test_a_rerun_that_saves_at_the_same_step_never_leaves_a_mixed_checkpoint(tmp_path, monkeypatch):
    """Run A saved step 4 into the directory; run B, another run (not a resume), saves
    step 4 there too and crashes after stage 0's file: A's checkpoint must still load
    whole (B's stage 0 file may not replace A's, which meta.json names)."""
    from synthpipe.engine import checkpoint as ckpt

    directory = str(tmp_path)
    batches = make_batches(8)
    a = trainer()
    a.fit(batches, max_steps=4, checkpoint=directory)
    # run B: the same model, other data (the batches in reverse order)
    b = sp.Trainer(sp.split(make_model(), n_stages=3), nn.CrossEntropyLoss(),
                   lambda p: torch.optim.Adam(p, lr=1e-2), progress=False, **OPTIONS)
    save_stage = ckpt.save_stage

    def crash_after_stage_0(directory, rank, step, state, suffix=""):
        if rank == 1:
            raise OSError("disk full")
        return save_stage(directory, rank, step, state, suffix)
    monkeypatch.setattr(ckpt, "save_stage", crash_after_stage_0)
    with pytest.raises(OSError, match="disk full"):
        b.fit(make_batches(8)[::-1], max_steps=4, checkpoint=directory)
    monkeypatch.undo()
    loaded = trainer()
    loaded.load(directory)
    assert_equal(everything(loaded), everything(a))  # A's, every stage
    b.save(directory)  # B's save at the same step, this time complete, replaces A's
    assert read_meta(directory)["suffix"] and len(os.listdir(directory)) == 4  # meta.json + 3 stage files
    loaded.load(directory)
    assert_equal(everything(loaded), everything(b))

"""Hugging Face models split as they come: small randomly initialised GPT-2 and BERT built from configs.

Needs the optional ``[hf]`` extra (``transformers``); skipped without it. Nothing is downloaded.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import synthpipe as sp

from multiprocess import run_ranks
from reference import assert_states_close

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the [hf] extra (transformers)")

pytestmark = [pytest.mark.timeout(240),
              # Tracing HF models warns about its own deprecations; the tests check synthpipe's warnings by name.
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB, BATCH, LENGTH = 50, 4, 12


def gpt2_config(**overrides) -> "transformers.GPT2Config":
    """A tiny GPT-2 with the library's defaults (use_cache=True, tied embeddings) unless overridden."""
    options = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**options, **overrides})


def lm(seed: int = 0, **overrides) -> nn.Module:
    """An untied GPT-2 LM without dropout, so a split can be compared with the unsplit model exactly."""
    torch.manual_seed(seed)
    config = gpt2_config(tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return transformers.GPT2LMHeadModel(config)


def padded_inputs(seed: int = 0, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Sequences that count up by one (learnable), right-padded: attention_mask has zeros."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    ids = (start + torch.arange(LENGTH)) % VOCAB
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (batch,), generator=g)
    lengths[0] = LENGTH // 2  # at least one padded sequence
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def lm_batches(n: int, seed: int = 1) -> list:
    """``(dict_of_inputs, target)`` batches: the target is the next token, -100 (ignored) on padding."""
    out = []
    for i in range(n):
        x = padded_inputs(seed + i)
        y = torch.roll(x["input_ids"], -1, dims=1)
        y[:, -1] = -100
        y[torch.roll(x["attention_mask"], -1, dims=1) == 0] = -100
        out.append((x, y))
    return out


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def split_lm(model: nn.Module) -> list[nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (no dropout left to freeze; nothing else to say)
        return sp.split(model, points=["transformer.h.1"], example_input=padded_inputs())


# --------------------------------------------------------------------------- tracing
def test_gpt2_with_its_default_config_splits_and_its_cache_setting_is_restored():
    torch.manual_seed(0)
    model = transformers.GPT2Model(gpt2_config()).eval()
    assert model.config.use_cache is True  # the default that made torch.export return a cache
    ids = padded_inputs()["input_ids"]
    stages = sp.split(model, points=["h.1"], example_input=ids)
    assert len(stages) == 2
    assert model.config.use_cache is True
    torch.testing.assert_close(sp.compose(stages, ids), model(ids).last_hidden_state, rtol=0, atol=0)


def test_gpt2_lm_with_its_default_config_fails_on_its_tied_embeddings_not_on_the_cache():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config())
    tied = r"'transformer.wte.weight' \(stage 0\) and 'lm_head.weight' \(stage 1\) are the same parameter.*untie"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=tied) as info:
        warnings.simplefilter("ignore", UserWarning)  # (its attention dropout is frozen: said, and not checked here)
        sp.split(model, points=["transformer.h.1"], example_input=padded_inputs())
    assert "Cache" not in str(info.value)
    assert model.config.use_cache is True


def test_a_cache_asked_for_in_forward_is_named_with_use_cache():
    class WithCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm()

        def forward(self, ids: torch.Tensor):
            out = self.lm(ids, use_cache=True)
            return out.logits, out.past_key_values

    with pytest.raises(ValueError, match=r"returns a key-value cache \(transformers\.cache_utils\.\w*Cache\).*"
                                         r"use_cache=False.*a use_cache=True argument in forward\(\)"):
        sp.split(WithCache(), points=["lm.transformer.h.1"], example_input=padded_inputs()["input_ids"])


def test_keyword_inputs_with_an_attention_mask_split_into_stages_that_match_the_model():
    model = lm().eval()
    inputs = padded_inputs()
    stages = split_lm(model)
    expected = model(**inputs).logits
    # The first stage takes the dict; its keys may come in any order.
    torch.testing.assert_close(sp.compose(stages, inputs), expected, rtol=0, atol=0)
    reordered = {"attention_mask": inputs["attention_mask"], "input_ids": inputs["input_ids"]}
    torch.testing.assert_close(sp.compose(stages, reordered), expected, rtol=0, atol=0)
    # The mask is used: without it the padded sequence comes out otherwise.
    unmasked = model(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(unmasked[0], expected[0])
    # Every parameter is the model's own, under the model's name.
    names = [k for s in stages for k in s.state_dict()]
    assert sorted(names) == sorted(model.state_dict())


def test_other_keyword_inputs_than_traced_are_refused_by_name():
    stages = split_lm(lm().eval())
    inputs = padded_inputs()
    with pytest.raises(ValueError, match=r"traced with keyword inputs \['input_ids', 'attention_mask'\], got "
                                         r"\['input_ids'\]; missing \['attention_mask'\]"):
        stages[0]({"input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match=r"not traced \['token_type_ids'\]"):
        stages[0]({**inputs, "token_type_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match=r"traced \(split at points\) with input_ids of shape \(4, 12\) and is given "
                                         r"\(2, 12\):int64.*drop_last=True"):
        stages[0]({k: v[:2] for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"takes them as one dict \(batches \(dict_of_inputs, target\)\), got "
                                         r"\(4, 12\):int64"):
        stages[0](inputs["input_ids"])


def test_a_dict_example_input_holds_tensors_only():
    inputs = {**padded_inputs(), "use_cache": False}
    with pytest.raises(ValueError, match=r"'use_cache' is False: set options such as use_cache or return_dict on the "
                                         r"model"):
        sp.split(lm(), points=["transformer.h.1"], example_input=inputs)


def test_bert_with_keyword_inputs_splits_and_matches_the_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    inputs = padded_inputs()
    stages = sp.split(model, points=["encoder.layer.1"], example_input=inputs)
    hidden, pooled = sp.compose(stages, inputs)
    expected = model(**inputs)
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=0, atol=0)


# --------------------------------------------------------------------------- training
def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def test_keyword_batches_train_in_backprop_mode_as_the_unsplit_model_does():
    batches = lm_batches(4)
    trainer = sp.Trainer(split_lm(lm()), lm_loss, adam, gradients="backprop", progress=False)
    trainer.fit(batches)
    model = lm()
    opt = adam(model.parameters())
    for x, y in batches:
        opt.zero_grad()
        lm_loss(model(**x).logits, y).backward()
        opt.step()
    assert_states_close(trainer.state_dict(), model.state_dict(), atol=1e-5)


def plain_lm_training(batches: list, epochs: int) -> dict:
    model = lm()
    opt = adam(model.parameters())
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            lm_loss(model(**x).logits, y).backward()
            opt.step()
    return model.state_dict()


def train_on_two_ranks(rank: int, batches: list, path: str) -> dict:
    backprop = sp.Trainer(split_lm(lm()), lm_loss, adam, gradients="backprop", progress=False)
    losses = backprop.fit(batches, epochs=3).losses
    backprop.export(path)
    backprop.close()
    # Synthetic gradients over the same boundary: a synthesizer is built for the hidden states and trained.
    synthetic = sp.Trainer(split_lm(lm()), lm_loss, adam, gradients="synthetic", synthesizer=sp.Synthesizer("auto"),
                           progress=False)
    synthetic_losses = synthetic.fit(batches).losses
    synth = synthetic.runner.stage.synth
    parts = None if synth is None else [type(p).__name__ for p in synth.parts]
    trained = synth is not None and bool(synth.parts[0].out.weight.abs().sum() > 0)  # (it starts at zero)
    synthetic.close()
    return {"losses": losses, "synthetic_losses": synthetic_losses, "synth": parts, "synth_trained": trained}


def test_keyword_inputs_with_an_attention_mask_train_on_two_ranks_and_the_export_loads_strictly(tmp_path):
    path = str(tmp_path / "gpt2.pt")
    batches = lm_batches(8)
    results = run_ranks(train_on_two_ranks, 2, batches, path, timeout=200)
    losses = results[0]["losses"]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # The export loads strictly into the original model, and is what training the unsplit model gives.
    model = lm()
    state = torch.load(path)
    model.load_state_dict(state, strict=True)
    assert_states_close(model.state_dict(), plain_lm_training(batches, epochs=3), atol=1e-5)
    assert not torch.equal(state["transformer.wte.weight"], lm().state_dict()["transformer.wte.weight"])
    # Boundary 0 carries the hidden states (B, T, D) and the boolean attention mask, which gets no gradient.
    assert results[0]["synth"] == ["TokenSynth", "Identity"] and results[0]["synth_trained"]
    assert results[1]["synth"] is None  # (the last stage has none)
    assert len(results[0]["synthetic_losses"]) == 8
    assert all(torch.isfinite(torch.tensor(results[0]["synthetic_losses"])))

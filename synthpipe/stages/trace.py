"""Splitting a model that is not an ``nn.Sequential``: tracing it at named points.

:func:`split_traced` is the tracing half of :func:`synthpipe.stages.split.split`: the model
is captured with ``torch.export`` through ``torch.distributed.pipelining.pipeline``
(tracing only: no process group is used), the stages it yields are rewired into a chain
(stage ``i + 1`` takes exactly what stage ``i`` returns), and the model's own childless
modules are put back where that is safe, so their train/eval behaviour stays live.
Each stage is a ``torch.fx.GraphModule``.

``example_input`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs
(a Hugging Face model's ``input_ids``, ``attention_mask``): the first stage then takes one
dict with the same keys. A model with a Hugging Face ``config.use_cache`` is traced with
it off (a key-value cache is not a tensor a stage can hand on) and the config is restored.

:func:`traced_input_shapes` and :func:`traced_output_shapes` tell a traced stage's
recorded shapes (for error messages); :func:`original_name` maps a traced parameter
name back to the model's.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import re
import warnings
from typing import Any, Iterator, Mapping, Sequence, cast

import torch
import torch.fx as fx
import torch.nn as nn

from .boundary import as_tuple, describe

__all__ = ["split_traced", "traced_input_shapes", "traced_output_shapes", "original_name"]


def _some_names(model: nn.Module, k: int = 10) -> list[str]:
    return [name for name, _ in model.named_modules() if name][:k]


def split_traced(model: nn.Module, points: list[str], example_input: Any) -> list[nn.Module]:
    if not points:
        return [model]  # one stage: the model itself
    if len(set(points)) != len(points):
        raise ValueError(f"split points {points} contain duplicates")
    for p in points:
        try:
            if not p:
                raise AttributeError(p)
            model.get_submodule(p)
        except AttributeError:
            names = _some_names(model, 12)
            raise ValueError(f"unknown split point {p!r}: {type(model).__name__} has no such "
                             f"submodule; valid names include {names}") from None
    if example_input is None:
        raise ValueError(f"split points {points} need example_input to trace "
                         f"{type(model).__name__}")
    args, kwargs = _call_inputs(example_input)

    # Imported here: only the tracer is used, never a process group.
    from torch.distributed.pipelining import SplitPoint, pipeline

    # pipeline() patches forward() of each split-point module in place and never undoes
    # it; remember what was there to restore the model afterwards.
    patched = [model.get_submodule(p) for p in points]
    saved: list[dict[str, Any]] = [{k: m.__dict__[k] for k in ("forward", "_orig_forward") if k in m.__dict__}
             for m in patched]
    try:
        with warnings.catch_warnings():
            # Tracing emits deprecation noise from torch internals; not the user's concern.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            with _without_cache(model):
                pipe = pipeline(model, args, kwargs or None, split_spec={p: SplitPoint.BEGINNING for p in points})
    except Exception as e:
        failure: Exception | None = e
    else:
        failure = None
    finally:
        for m, before in zip(patched, saved, strict=True):
            for k in ("forward", "_orig_forward"):
                m.__dict__.pop(k, None)
            m.__dict__.update(before)
    if failure is not None:
        raise _why_tracing_failed(model, points, args, kwargs, failure) from failure

    if pipe.num_stages != len(points) + 1:
        _check_points_run_once(model, points, args, kwargs)
        raise ValueError(f"split points {points} gave {pipe.num_stages} stages, expected "
                         f"{len(points) + 1}; every point must run once in forward(), after "
                         f"some computation, and on a distinct boundary")
    try:
        stages = [cast(fx.GraphModule, pipe.get_stage_module(i)) for i in range(pipe.num_stages)]
    except AttributeError as e:  # (a point called twice leaves a stage without its module)
        raise _why_tracing_failed(model, points, args, kwargs, e) from e
    _chain(pipe.split_gm, stages)
    if kwargs:
        _take_keywords(stages[0], len(args), kwargs)
    for i, stage in enumerate(stages):
        _restore_leaves(stage, model, i)
        _warn_frozen_dropout(stage, model, i)
        stage.training = model.training
    _check_no_parameter_in_two_traced_stages(stages)
    out: list[nn.Module] = list(stages)
    return out


def traced_input_shapes(stage: nn.Module) -> list[tuple[int, ...] | None] | None:
    """The input shapes a traced stage was recorded with (``None`` entries for non-tensor
    inputs), or ``None`` for a stage that was not traced."""
    graph = getattr(stage, "graph", None)
    if not isinstance(stage, fx.GraphModule) or not isinstance(graph, fx.Graph):
        return None
    shapes = []
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shapes.append(tuple(val.shape) if isinstance(val, torch.Tensor) else None)
    return shapes


def traced_output_shapes(stage: nn.Module) -> list[tuple[int, ...] | None] | None:
    """The output shapes a traced stage produced when traced (``None`` entries for values
    whose shape was not recorded), or ``None`` for a stage that was not traced."""
    graph = getattr(stage, "graph", None)
    if not isinstance(stage, fx.GraphModule) or not isinstance(graph, fx.Graph):
        return None
    _, values = _output_values(graph)
    return [tuple(v.meta["val"].shape) if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)
            else None for v in values]


def _check_no_parameter_in_two_traced_stages(stages: Sequence[nn.Module]) -> None:
    """A parameter used by two stages (tied weights, a root-level parameter, a module
    called on both sides of a point) would be trained as two copies, one per process.

    The tracer gives each stage that uses it the same object or a copy under the original
    name, so both are looked for. Buffers may be shared: a constant table used by every
    layer (rotary embeddings) is copied harmlessly, and export checks the copies agree.
    """
    by_id: dict[int, tuple[int, str]] = {}
    by_name: dict[str, int] = {}
    for i, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            name = original_name(name)
            first = by_id.setdefault(id(p), (i, name))
            if first[0] == i and by_name.setdefault(name, i) == i:
                continue
            a, a_name = first if first[0] != i else (by_name[name], name)
            where = (f"'{a_name}' (stage {a}) and '{name}' (stage {i}) are the same parameter"
                     if a_name != name else f"'{name}' is used by stage {a} and stage {i}")
            raise ValueError(f"{where}: each stage trains its own copy in its own process, so the weight would "
                             f"stop being shared (tied embeddings, a parameter of the model itself, or a module "
                             f"called on both sides of a split point); move the split points so that every use "
                             f"falls in one stage, or untie the weights")


def _run_as_is(model: nn.Module, args: tuple, kwargs: dict[str, Any], points: list[str]) -> list[int]:
    """Run ``model(*args, **kwargs)`` eagerly, as the user would; returns how often each point's
    module was called. Parameters and buffers (BatchNorm statistics) are left as they were."""
    calls = [0] * len(points)
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, p in enumerate(points)]
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad(), _without_cache(model):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
    return calls


def _check_points_run_once(model: nn.Module, points: list[str], args: tuple, kwargs: dict[str, Any]) -> None:
    calls = _run_as_is(model, args, kwargs, points)
    for p, n in zip(points, calls, strict=True):
        if n != 1:
            raise ValueError(f"split point {p!r} is called {n} times by {type(model).__name__}.forward(); a "
                             f"stage begins where its module runs, so it must run exactly once: choose a "
                             f"module called once (a point inside a module that forward() calls twice, or "
                             f"one that is never called, cannot mark a boundary)")


def _why_tracing_failed(model: nn.Module, points: list[str], args: tuple, kwargs: dict[str, Any],
                        error: Exception) -> ValueError:
    """The reason a traced split failed, in the user's terms (torch's own message is a
    graph dump that ends by pointing at torch's manual pipeline API)."""
    name = type(model).__name__
    call = f"{name}(**example_input)" if kwargs else f"{name}(*example_input)"
    try:
        _check_points_run_once(model, points, args, kwargs)
    except ValueError as e:
        return e
    except Exception as e:  # the model itself fails on example_input: that is the real error
        return ValueError(f"{call} fails when run as is, so it cannot be traced for "
                          f"splitting: {type(e).__name__}: {_first_line(e)} (example_input: "
                          f"{describe([kwargs] if kwargs else args)})")
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    where = _user_frame(root)
    cache = re.search(r"Found <class '([\w.]*Cache)'> in output", str(root))
    if cache:  # a Hugging Face model returned its key-value cache
        return ValueError(f"torch.export could not capture {name}.forward() as one graph, which a split at points "
                          f"needs: it returns a key-value cache ({cache.group(1)}), which is not a tensor a stage "
                          f"can hand on. Turn the cache off with use_cache=False: synthpipe sets the model's "
                          f"config.use_cache to False while tracing, so something else asks for it (a "
                          f"use_cache=True argument in forward(), or a config that is not the model's own)")
    return ValueError(f"torch.export could not capture {name}.forward() as one graph, which a split at points "
                      f"needs: {type(root).__name__}: {_first_line(root)}{where}. Typical causes: Python control "
                      f"flow on tensor values (`if h.sum() > 0:`; use torch.where), .item() or .tolist(), "
                      f"shapes that depend on data. Rewrite that code, or build the model as an nn.Sequential "
                      f"(split by children, without tracing)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _user_frame(error: BaseException) -> str:
    """`` at file:line (code)`` of the innermost frame outside torch and synthpipe, if any."""
    import traceback

    outside = [f for f in traceback.extract_tb(error.__traceback__)
               if f"{os.sep}torch{os.sep}" not in f.filename and f"{os.sep}synthpipe{os.sep}" not in f.filename
               and not f.filename.startswith("<")]
    if not outside:
        return ""
    f = outside[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _call_inputs(example_input: Any) -> tuple[tuple, dict[str, Any]]:
    """``example_input`` as positional and keyword inputs: a tuple or list is positional, a
    dict is keyword (every value a tensor), anything else is the one positional input."""
    if isinstance(example_input, Mapping):
        kwargs = dict(example_input)
        for k, v in kwargs.items():
            if not isinstance(k, str) or not torch.is_tensor(v):
                raise ValueError(f"example_input as a dict holds the model's keyword inputs, each a tensor; "
                                 f"{k!r} is {describe([v])}: set options such as use_cache or return_dict on "
                                 f"the model (its config), not in the input")
        if not kwargs:
            raise ValueError("example_input is an empty dict; give the model's keyword inputs (input_ids=...)")
        return (), kwargs
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


@contextlib.contextmanager
def _without_cache(model: nn.Module) -> Iterator[None]:
    """Trace a Hugging Face model with ``config.use_cache`` off, restored afterwards.

    With it on, the model returns a key-value cache object, which ``torch.export`` cannot
    return from a graph and a stage could not send on; split stages never decode step by
    step, so the cache is of no use to them. The model's own configuration objects (its
    submodules usually share one) are switched, and put back even if tracing fails.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _keyword_inputs(inputs: Any, keys: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> tuple:
    """The values of ``inputs`` (a dict) for ``keys``, in order; called by a traced first stage.

    Raises:
        ValueError: not a dict, other keys, or other shapes than when traced.
    """
    if not isinstance(inputs, Mapping):
        raise ValueError(f"stage 0 was traced with keyword inputs {list(keys)} and takes them as one dict "
                                f"(batches (dict_of_inputs, target)), got {describe([inputs])}")
    if set(inputs) != set(keys):
        missing, extra = [k for k in keys if k not in inputs], [k for k in inputs if k not in keys]
        raise ValueError(f"stage 0 was traced with keyword inputs {list(keys)}, got {list(inputs)}"
                                f"{f'; missing {missing}' if missing else ''}{f'; not traced {extra}' if extra else ''}"
                                f": give example_input the keys the training batches have")
    values = tuple(inputs[k] for k in keys)
    for k, v, shape in zip(keys, values, shapes, strict=True):
        if not torch.is_tensor(v) or tuple(v.shape) != shape:
            raise ValueError(
                f"stage 0 was traced (split at points) with {k} of shape {shape} and is given {describe([v])}; "
                f"tracing fixes the sizes the model's code computes with, so give example_input the training "
                f"shapes and drop a smaller last batch (DataLoader(drop_last=True))")
    return values


def _take_keywords(stage: fx.GraphModule, n_args: int, kwargs: dict[str, Any]) -> None:
    """Make the (chained) first stage take its keyword inputs as one dict: ``stage(inputs)``.

    Its placeholders are the model's inputs in the order they were flattened for tracing,
    positional first, then ``kwargs`` in their order; the engine hands the first stage the
    batch's input as one value, so a dict of keyword inputs stays one value.
    """
    graph = stage.graph
    old = [n for n in graph.nodes if n.op == "placeholder"]
    keys = tuple(kwargs)
    if n_args or len(old) != len(keys):
        raise RuntimeError(f"traced first stage has {len(old)} inputs for keyword inputs {list(keys)}")
    shapes = tuple(tuple(v.shape) for v in kwargs.values())
    with graph.inserting_before(old[0]):
        inputs = graph.placeholder("inputs")
    with graph.inserting_after(old[-1]):
        values = graph.call_function(_keyword_inputs, (inputs, keys, shapes))
    with graph.inserting_after(values):
        for j, node in enumerate(old):
            item = graph.call_function(operator.getitem, (values, j))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item)
    for node in old:
        graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    stage.recompile()


Key = tuple[Any, Any]  # ("in", j) for model input j, (stage, index) for a stage output


def _output_values(graph: fx.Graph) -> tuple[fx.Node, list[Any]]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    return out, list(value) if isinstance(value, (tuple, list)) else [value]


def _chain(split_gm: fx.GraphModule, stages: list[fx.GraphModule]) -> None:
    """Rewrite traced stages in place into a chain: stage i+1 takes what stage i returns.

    ``pipeline()`` wires stages as a DAG: a value made by stage 0 and used by stage 2 goes
    straight from 0 to 2. The engine only ever hands stage i's output to stage i+1, so
    such values are added to the outputs of the stages in between (pass-through), and
    every stage's placeholders become exactly the previous boundary, in order. Stage 0
    takes all of the model's positional inputs; the last stage returns the model's
    (flattened) outputs.
    """
    key: dict[fx.Node, Key] = {}
    calls: list[fx.Node] = []
    final: list[Any] = []
    n_in = 0
    for node in split_gm.graph.nodes:
        if node.op == "placeholder":
            key[node] = ("in", n_in)
            n_in += 1
        elif node.op == "call_module":
            key[node] = (len(calls), None)
            calls.append(node)
        elif node.op == "call_function" and node.target is operator.getitem \
                and node.args[0] in key and key[node.args[0]][1] is None:
            key[node] = (key[node.args[0]][0], node.args[1])
        elif node.op == "output":
            final = list(as_tuple(node.args[0]))
        else:
            raise RuntimeError(f"unexpected node {node.format_node()} in the traced pipeline")
    if len(calls) != len(stages) or any(getattr(split_gm, str(c.target)) is not s
                                        for c, s in zip(calls, stages, strict=True)):
        raise RuntimeError("traced pipeline stages are not called in order")
    for v in final:
        if not isinstance(v, fx.Node):
            raise ValueError(f"model output {v!r} is not a tensor; traced stages return tensors")
    final_keys = [key[v] for v in final]
    args = [[key[cast(fx.Node, a)] for a in c.args] for c in calls]

    own: list[list[Key]] = []
    for i, stage in enumerate(stages):
        out, values = _output_values(stage.graph)
        bare = not isinstance(out.args[0], (tuple, list))
        own.append([(i, None)] if bare else [(i, k) for k in range(len(values))])

    boundary: list[Key] = [("in", j) for j in range(n_in)]
    for i, stage in enumerate(stages):
        if i == len(stages) - 1:
            out_keys = final_keys
        else:
            later = {k for a in args[i + 1:] for k in a} | set(final_keys)
            out_keys = own[i] + [k for k in boundary if k in later and k not in own[i]]
        if args[i] != boundary or out_keys != own[i]:
            _rewrite(stage, args[i], boundary, own[i], out_keys)
        boundary = out_keys


def _rewrite(stage: fx.GraphModule, arg_keys: list[Key], in_keys: list[Key],
             own_keys: list[Key], out_keys: list[Key]) -> None:
    """Give ``stage`` placeholders ``in_keys`` and outputs ``out_keys`` (see :func:`_chain`)."""
    graph = stage.graph
    old = [n for n in graph.nodes if n.op == "placeholder"]
    if len(old) != len(arg_keys) or not set(arg_keys) <= set(in_keys):
        raise RuntimeError("traced stage inputs do not match the pipeline graph")
    first = next(iter(graph.nodes))
    new: dict[Key, fx.Node] = {}
    with graph.inserting_before(first):
        for pos, k in enumerate(in_keys):
            new[k] = graph.placeholder(f"boundary_{pos}")
    for node, k in zip(old, arg_keys, strict=True):
        if not new[k].meta:
            new[k].meta = dict(node.meta)
        node.replace_all_uses_with(new[k])
        graph.erase_node(node)

    out, values = _output_values(graph)
    local = dict(zip(own_keys, values, strict=True))
    result = [local[k] if k in local else new[k] for k in out_keys]
    out.args = (tuple(result) if len(result) != 1 else result[0],)
    out.meta = {}
    # The first stage may carry the model's pytree calling convention; plain args now.
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    stage.recompile()


_CALL_SUFFIX = re.compile(r"@\d+(?=\.|$)")


def original_name(name: str) -> str:
    """The model's name for a traced stage's ``name``: the tracer calls a module's second
    call ``blk@1`` (its tensors ``blk@1.weight``), which is the model's ``blk``."""
    return _CALL_SUFFIX.sub("", name)


def _restore_leaves(stage: fx.GraphModule, model: nn.Module, index: int) -> None:
    """Put the model's own childless modules back in place of their traced graphs.

    A traced submodule is an ``InterpreterModule`` whose graph was recorded in the mode
    the model had when traced (e.g. BatchNorm with ``training=True`` baked in). For a leaf
    this is only safe to undo where the call is unambiguous: a single tensor in, a single
    tensor out, and an original ``forward(input)`` that takes nothing else (the graph
    drops constant arguments and orders several inputs by creation, not by position).
    """
    for name, traced in list(stage.named_modules()):
        if not name or not hasattr(traced, "graph"):
            continue
        # A second call of a shared module is traced as "name@1".
        orig_name = original_name(name)
        try:
            orig = model.get_submodule(orig_name)
        except AttributeError:
            continue
        if orig is traced or next(orig.children(), None) is not None:
            continue
        parent_name, _, atom = name.rpartition(".")
        parent = stage.get_submodule(parent_name) if parent_name else stage
        if _restorable(parent, atom, traced, orig):
            setattr(parent, atom, orig)
        elif len(list(orig.buffers())):  # (a dropout left traced is found by _warn_frozen_dropout)
            warnings.warn(f"stage {index}: {name!r} ({type(orig).__name__}) stays a traced graph "
                          f"frozen to the train/eval mode the model had when traced",
                          stacklevel=4)


_DROPOUT_OPS = ("aten.dropout.", "aten.native_dropout.", "aten.feature_dropout.", "aten.alpha_dropout.",
                "aten.feature_alpha_dropout.")


def _dropout_rate(node: fx.Node) -> float:
    """The dropout probability a traced call applies (0.0 for any other call)."""
    target = str(node.target)
    if target.startswith(_DROPOUT_OPS):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
    elif target.startswith("aten.scaled_dot_product_attention."):
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    else:
        return 0.0
    return float(p) if isinstance(p, (int, float)) else 0.0


def _warn_frozen_dropout(stage: fx.GraphModule, model: nn.Module, index: int) -> None:
    """Warn where dropout survived only as traced code: it keeps the mode of the trace.

    nn.Dropout leaves are put back as live modules (:func:`_restore_leaves`); what is left
    is dropout inside code that was inlined, such as the attention dropout of
    ``nn.MultiheadAttention`` or ``F.dropout(x, p, self.training)`` in a forward with
    children. Traced in training mode it also drops units in eval; traced in eval mode,
    attention dropout is gone from the graph, so the model's own modules are checked too.
    """
    traced_training = model.training
    frozen = []
    for name, module in stage.named_modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, fx.Graph) and any(n.op == "call_function" and _dropout_rate(n) > 0 for n in graph.nodes):
            frozen.append(name or "the model's own forward()")
    if not traced_training:  # attention dropout traced in eval mode left no node behind
        for name, module in stage.named_modules():
            try:
                orig = model.get_submodule(original_name(name)) if name else None
            except AttributeError:
                continue
            if isinstance(orig, nn.MultiheadAttention) and orig.dropout > 0 and module is not orig:
                frozen.append(name)
    if frozen:
        state = "training" if traced_training else "eval"
        effect = ("it keeps dropping units after .eval(), so evaluation is random" if traced_training
                  else "it stays off during training")
        warnings.warn(f"stage {index}: dropout in traced code ({', '.join(dict.fromkeys(frozen))}) is frozen to the "
                      f"{state} mode the model had when split: {effect}. nn.Dropout modules stay live; attention "
                      f"dropout and F.dropout inside a module with children do not. Set those dropout rates to 0 "
                      f"if that matters", stacklevel=4)


def _restorable(parent: nn.Module, atom: str, traced: nn.Module, orig: nn.Module) -> bool:
    graph = getattr(parent, "graph", None)
    if not isinstance(graph, fx.Graph):
        return False
    sites = [n for n in graph.nodes if n.op == "call_module" and n.target == atom]
    if not sites:
        return False
    for site in sites:
        if site.kwargs or len(site.args) != 1 or not isinstance(site.args[0], fx.Node):
            return False
        val = site.args[0].meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            return False
    # One value out (BatchNorm used twice threads its counter out as a second value).
    if not isinstance(_output_values(cast(fx.Graph, traced.graph))[0].args[0], fx.Node):
        return False
    try:
        params = list(inspect.signature(orig.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)

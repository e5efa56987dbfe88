"""The graph of one training step, traced from the model's own code without any weights.

`mlxft run` evaluates, per optimizer step, the compiled micro-step (forward, chunked loss,
backward) and the compiled update (gradient scaling, clipping, the optimizer) in one `mx.eval`.
Here the same mlx-lm model class is built from config.json with lazy random weights (never
evaluated, so a 70B model costs no memory), quantized and given adapters as a recipe would, and
that step is traced with `mx.export_function`, whose callback lists every primitive with its
inputs, outputs, shapes and dtypes. `planner.replay` then fuses, orders and replays that graph.

Three parts of the real step cannot be exported: `mx.custom_function` (the fused loss chunk,
mlx_ft.losses._fused_chunk) and `mx.checkpoint` (gradient checkpointing) both make a
CustomTransforms primitive, and the gradient of `mx.gather_mm` for the experts' weights of a
mixture of experts is a SegmentedMM; neither has exportable state in MLX 0.32. They are traced as
surrogates that give the same backward graph: a custom function's output is a `Depends` view of
its value that reads its arguments (as CustomTransforms does), and its backward comes from an
extra term added to it: `s = value(x) - stop_gradient(value(x))` (checkpointing: the recompute),
`sum(stop_gradient(dL/dh) * h)` (the fused chunk: `cotangent * dL/dh`), or `a @ b[0]` minus
itself (gather_mm: a weight-sized gradient from the same inputs). `rewire` then drops the extra
terms from the forward pass, so only their backward remains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .configs import ModelShape
from .settings import Settings

# Fields mlx-lm's ModelArgs require that trimmed configs (models.json) may lack; none changes a
# shape, a dtype or the graph's structure.
ARG_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
                "layer_norm_eps": 1e-5, "norm_eps": 1e-5}


class TraceError(Exception):
    """The step cannot be traced (a model mlx-lm cannot build lazily, a primitive without export)."""


@dataclass
class Traced:
    """The exported step: `inputs` and `constants` are evaluated arrays (name, shape, dtype),
    `prims` the export callback's primitive records in tape order, `outputs` what `mx.eval`
    receives in the training loop, `micro_outputs` the compiled micro-step's outputs (the update
    is compiled separately, so fusion does not cross that line)."""

    inputs: list
    constants: list
    prims: list
    outputs: list[str]
    micro_outputs: list[str]
    inputs_breakdown: dict[str, int]
    """Bytes of the evaluated inputs: weights, quantization overhead, adapters, optimizer state, batch."""
    vocab: int
    positions: int
    """Positions per row the model sees (max_seq_len - 1)."""


def build_model(shape: ModelShape, st: Settings, config: dict):
    """The mlx-lm model of `config` with lazy weights, quantized and adapted as `st` says."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    from .. import models
    from ..recipe import AdapterConfig

    cfg = dict(config)
    try:
        model_cls, args_cls = _get_classes(cfg)
    except ValueError as e:
        raise TraceError(str(e)) from None
    for _ in range(4):  # fill what ModelArgs insists on and the config lacks
        try:
            args = args_cls.from_dict(cfg)
            break
        except TypeError as e:
            missing = [m for m in re.findall(r"'(\w+)'", str(e)) if m in ARG_DEFAULTS and m not in cfg]
            if not missing:
                raise TraceError(f"mlx-lm cannot build {shape.name} from its config: {e}") from None
            cfg.update({m: ARG_DEFAULTS[m] for m in missing})
    else:
        raise TraceError(f"mlx-lm cannot build {shape.name} from its config")
    model = model_cls(args)
    model.set_dtype({"float32": mx.float32, "float16": mx.float16}.get(shape.dtype, mx.bfloat16))
    if st.quant_bits:
        models.quantize(model, st.quant_bits, st.quant_group, st.quant_mode)
    elif shape.quantized_bits:  # a pre-quantized checkpoint: what mlx-lm's load quantizes
        nn.quantize(model, class_predicate=lambda path, m: _checkpoint_params(shape, path, m))
    targets = "all-linear" if "all-linear" in st.targets else list(st.targets)
    models.apply_adapters(model, AdapterConfig(method=st.method, rank=st.rank, targets=targets,
                                               layers="all" if st.layers is None else st.layers))
    return model


def _checkpoint_params(shape: ModelShape, path: str, module) -> dict | bool:
    q = shape.checkpoint_quant(path)
    if q is None or not hasattr(module, "to_quantized") or module.weight.shape[-1] % q[1]:
        return False
    return {"bits": q[0], "group_size": q[1], "mode": q[2]}


def _optimizer(st: Settings):
    from ..recipe import TrainingConfig
    from ..step import build_optimizer

    return build_optimizer(TrainingConfig(optimizer=st.optimizer), 1000)


def trace_step(model, st: Settings, max_grad_norm: float = 1.0) -> Traced:
    """Export the graph `mx.eval` sees at the end of one optimizer step of `mlxft run` (one micro-step)."""
    import mlx.core as mx

    from .. import losses

    step, args, held, counts = step_function(model, st, max_grad_norm)
    records: list[dict] = []
    saved = model.parameters()
    try:
        mx.export_function(records.append, step, *args)
    except ValueError as e:  # a primitive whose state MLX cannot export
        raise TraceError(str(e)) from None
    finally:
        model.update(saved)  # tracing left placeholders in the model
    return rewire(records, *counts, held, losses._vocab(model), st.seq_len)


def step_function(model, st: Settings, max_grad_norm: float = 1.0):
    """(step, its arguments, bytes of those by kind, [final outputs, micro-step outputs]): the
    function `trace_step` exports; its arguments are the model's parameters, a batch of zeros
    and the optimizer state. Called with them (compiled) it runs the step: with loss_chunk 0 and
    no checkpointing it is the training step itself, with no surrogate."""
    import contextlib

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from .. import losses, models, objectives
    from ..chunking import chunk_positions
    from ..step import apply_update

    optimizer = _optimizer(st)
    optimizer.init(model.trainable_parameters())
    params = tree_flatten(model.parameters())
    names = [k for k, _ in params]
    tnames = [k for k, _ in tree_flatten(model.trainable_parameters())]
    state = [(k, v) for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)]
    B, L = st.rows, st.seq_len + 1  # a preference example is two rows
    # A full fine-tune's frozen reference: its own copy of the trained weights, sharing the rest.
    ref_model = models.frozen_copy(model) if st.reference == "copy" else None
    trained_names = set(tnames)
    ref_trained = ([v for k, v in tree_flatten(ref_model.parameters()) if k in trained_names]
                   if ref_model else [])
    block_cls = type(model.layers[0])
    plain_call = block_cls.__call__
    pairs: list[tuple] = []  # (surrogate, what it stands for in the forward pass)

    def checkpointed(self, x, *args, **kwargs):
        """mx.checkpoint(block): the value; a view of it that reads the primals; the recompute."""
        y = mx.stop_gradient(plain_call(self, x, *args, **kwargs))
        own = tree_flatten(self.trainable_parameters())
        arrays = [v for v in args if isinstance(v, mx.array)]
        primals = [v for _, v in own] + [x] + arrays
        y = mx.depends([y], [mx.stop_gradient(p) for p in primals])[0]
        if not own:
            return y
        dep = mx.depends(primals, [y])  # the recompute waits for the forward output, as in MLX
        n = len(own)
        self.update(tree_unflatten([(k, v) for (k, _), v in zip(own, dep[:n])]))
        rest = iter(dep[n + 1:])
        r = plain_call(self, dep[n], *[next(rest) if isinstance(v, mx.array) else v for v in args], **kwargs)
        self.update(tree_unflatten(own))
        out = y + (r - mx.stop_gradient(r))
        pairs.append((out, y))
        return out

    real_gather_mm = mx.gather_mm

    def gather_mm(a, b, *args, **kwargs):
        """The experts' matmul. Its gradient for the experts' weights is a SegmentedMM, which MLX
        0.32 cannot export: that gradient comes from a surrogate term instead, a matmul of the
        same inputs whose backward writes a weight-sized array (a slice update of b's shape)."""
        out = real_gather_mm(a, mx.stop_gradient(b), *args, **kwargs)
        sur = mx.stop_gradient(a) @ b[0]
        both = out + (sur - mx.stop_gradient(sur))
        pairs.append((both, out))
        return both

    def policy_logps(tokens, segments, grad):
        """losses.token_logps with the fused chunks as surrogates."""
        if not grad:
            return losses.token_logps(model, tokens, segments, st.loss_chunk, grad=False)
        h = losses._hidden(model, tokens[:, :-1], segments[:, :-1] if segments is not None else None)
        targets, n = tokens[:, 1:], h.shape[1]
        step_ = chunk_positions(st.loss_chunk, tokens.shape[0], losses._vocab(model), n)
        if not st.loss_chunk:
            return losses.target_logps(model, h, targets)
        parts = []
        for s in range(0, n, step_):
            t_c, h_c = targets[:, s:s + step_], h[:, s:s + step_]
            (value,), (jac,) = mx.vjp(lambda x: [losses.target_logps(model, x, t_c)], [mx.stop_gradient(h_c)],
                                      [mx.ones(t_c.shape, dtype=mx.float32)])
            value, jac = mx.depends([value, jac], [mx.stop_gradient(h_c)])
            both = mx.stop_gradient(value) + (mx.stop_gradient(jac).astype(mx.float32)
                                              * h_c.astype(mx.float32)).sum(-1)  # backward: cotangent x jac
            pairs.append((both, value))
            parts.append(both)
        return mx.concatenate(parts, axis=1)

    def step(*arrays):
        model.update(tree_unflatten(list(zip(names, arrays[:len(names)]))))
        optimizer.state = tree_unflatten(list(zip([k for k, _ in state], arrays[len(arrays) - len(state):])))
        tokens, mask = arrays[len(names)], arrays[len(names) + 1]
        segments = arrays[len(names) + 2] if st.pack else None
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        weights = mask[:, 1:].astype(mx.float32)
        seg = segments[:, :-1] if segments is not None else None
        trainable = dict(tree_flatten(model.trainable_parameters()))
        if ref_model is not None:  # the frozen weights shared with the policy, its own trained ones
            own = arrays[len(names) + len(batch):len(names) + len(batch) + len(ref_trained)]
            ref_model.update(tree_unflatten([(k, a) for k, a in zip(names, arrays) if k not in trainable]
                                            + list(zip(tnames, own))))

        def preference(*t):  # objectives.preference_loss, with the surrogate chunks
            model.update(tree_unflatten(list(zip(tnames, t))))
            seq, meta = arrays[len(names) + 2], arrays[len(names) + 3]
            packed = seq if st.pack else None
            ref = None
            if st.reference in ("bypass", "copy"):
                with models.adapters_off() if st.reference == "bypass" else contextlib.nullcontext():
                    ref = losses.token_logps(ref_model or model, tokens, packed, st.loss_chunk, grad=False)
            policy = objectives.policy_logps(objective, policy_logps, objectives.after(tokens, ref), packed,
                                             True)
            return [objectives.loss_from_logps(objective, policy, ref, mask, seq, meta)[0]]

        def loss(*t):  # losses.loss_sum with the fused chunks as surrogates
            model.update(tree_unflatten(list(zip(tnames, t))))
            h = losses._hidden(model, inputs, seg)
            n = h.shape[1]
            step_ = chunk_positions(st.loss_chunk, B, losses._vocab(model), n)

            def chunk_loss(h_c, t_c, w_c):
                return losses.masked_loss_sum(model, h_c, t_c, w_c)

            if not st.loss_chunk:  # loss_chunk_size 0: plain autodiff over the whole logits
                return [chunk_loss(h, targets, weights)]
            total = mx.array(0.0, dtype=mx.float32)
            for s in range(0, n, step_):
                t_c, w_c, h_c = targets[:, s:s + step_], weights[:, s:s + step_], h[:, s:s + step_]
                (value,), (dh,) = mx.vjp(lambda x: [chunk_loss(x, t_c, w_c)], [mx.stop_gradient(h_c)],
                                         [mx.array(1.0, dtype=mx.float32)])
                value, dh = mx.depends([value, dh], [mx.stop_gradient(h_c)])
                both = mx.stop_gradient(value) + (mx.stop_gradient(dh).astype(mx.float32)
                                                  * h_c.astype(mx.float32)).sum()
                pairs.append((both, value))
                total = total + both
            return [total]

        if st.grad_checkpointing:
            block_cls.__call__ = checkpointed
        mx.gather_mm = gather_mm
        try:
            fn = loss if objective is None else preference
            (loss_sum,), grads = mx.vjp(fn, [trainable[k] for k in tnames], [mx.array(1.0, dtype=mx.float32)])
        finally:
            block_cls.__call__ = plain_call
            mx.gather_mm = real_gather_mm
        n_tok = weights.sum()
        micro = [loss_sum, n_tok, *grads]
        # the update, as the training loop runs it (mlx_ft.step)
        loss_total, tok_total = mx.array(0.0) + loss_sum, mx.array(0.0) + n_tok
        norm = apply_update(model, optimizer, tree_unflatten(list(zip(tnames, grads))), tok_total,
                            max_grad_norm)
        final = [v for _, v in tree_flatten(model.trainable_parameters())]
        final += ([v for _, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)]
                  + [loss_total, tok_total, norm])
        counts[:] = [len(final), len(micro)]
        return final + micro + [a for p in pairs for a in p]

    counts: list[int] = []
    objective = None if st.objective == "sft" else objectives.Objective(st.objective)
    batch = [mx.zeros((B, L), mx.int32), mx.ones((B, L), mx.bool_)]
    if objective is None:
        batch += [mx.zeros((B, L), mx.int32)] if st.pack else []
    else:  # data.preference.collate's arrays: one example per row pair, its capacity a multiple of 8
        cap = -(-st.batch_size // 8) * 8
        rows = mx.arange(B) % st.batch_size + (mx.arange(B) >= st.batch_size) * cap  # [B] each row's sequence
        batch += [mx.array(mx.broadcast_to(rows[:, None], (B, L)), dtype=mx.int32),
                  mx.zeros((cap, 3), mx.float32)]
    trained = set(tnames)
    held = {"weights": 0, "quantization overhead": 0, "adapters": 0, "optimizer state": 0, "batch": 0}
    for k, v in params:
        kind = ("adapters" if st.method != "full" else "weights") if k in trained else \
            "quantization overhead" if k.endswith((".scales", ".biases")) else "weights"
        held[kind] += v.nbytes
    held["optimizer state"] = sum(v.nbytes for _, v in state)
    held["batch"] = sum(a.nbytes for a in batch)
    if ref_trained:
        held["reference copy"] = sum(v.nbytes for v in ref_trained)
    return step, [v for _, v in params] + batch + ref_trained + [v for _, v in state], held, counts


def rewire(records: list[dict], n_final: int, n_micro: int, held: dict, vocab: int, positions: int) -> Traced:
    """Read each surrogate as what it stands for and drop what no output needs any more."""
    def section(kind):
        return next(r for r in records if r["type"] == kind)[kind]

    outs = [o[0] for o in section("outputs")]
    extra = outs[n_final + n_micro:]
    sub = dict(zip(extra[0::2], extra[1::2]))

    def real(name):
        while name in sub:
            name = sub[name]
        return name

    prims = [r for r in records if r["type"] == "primitive"]
    for p in prims:
        p["inputs"] = [(real(n), s, t) for n, s, t in p["inputs"]]
    producer = {o[0]: p for p in prims for o in p["outputs"]}
    wanted = [real(o) for o in outs[:n_final + n_micro]]
    keep, seen, stack = set(), set(), list(wanted)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        p = producer.get(name)
        if p is not None and id(p) not in keep:
            keep.add(id(p))
            stack.extend(i[0] for i in p["inputs"])
    views_of_custom = set(sub.values())
    prims = [p for p in prims if id(p) in keep]
    for p in prims:  # the custom functions' nodes: CustomTransforms lists its arguments first
        if p["name"] == "Depends" and any(o[0] in views_of_custom for o in p["outputs"]):
            k = len(p["outputs"])
            p["inputs"] = p["inputs"][k:] + p["inputs"][:k]
            p["custom"] = True
    return Traced(section("inputs"), section("constants"), prims, wanted[:n_final], wanted[n_final:], held,
                  vocab, positions)

"""The training step's peak memory, from MLX's own graph of it, replayed the way MLX evaluates it.

`trace.trace_step` gives the step's primitives with their shapes. This module does to them what
MLX does before and during `mx.eval`:

1. **Fusion** (`fuse`, after mlx/compile.cpp `compile_fuse`): the compiled micro-step and update
   merge chains of element-wise ops into one kernel whose intermediates are never allocated (at
   most 11 deep and 24 arrays; a broadcast with readers outside the chain is split).
2. **Buffers** (`to_graph`): views (slices, transposes, broadcasts, reshapes of contiguous
   arrays, Depends) share their input's buffer; a reshape of a non-contiguous array copies;
   element-wise ops, fused kernels, softmax and slice updates may take a donated input buffer of
   the same size; everything else allocates its outputs.
3. **Order and lifetimes** (`schedule._tape`, `schedule._replay_timed`): eval_impl's
   breadth-first order (a primitive's outputs count once), and the main thread running ahead of
   the CPU stream's worker, which frees each buffer after its last reader. How far ahead is timed:
   the worker's cost of each op (FLOPs, bytes, slow element-wise functions) against the main
   thread's time per array, with the main thread waiting when more than 10 tasks of 10
   dispatches are unfinished; slow ops let it run the full ~110 dispatches ahead.

Nothing here is fitted to the grid: the rules are MLX's, the timing constants (`CPU`) were
measured once with micro-benchmarks. On graphs that need no surrogate (loss_chunk_size 0, no
checkpointing) the replayed peak is within 1-3 % of `mx.get_peak_memory()` for the same compiled
function (`tests/test_planner_replay.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import schedule

UNARY = frozenset("Abs ArcCos ArcCosh ArcSin ArcSinh ArcTan ArcTanh AsType Ceil Cos Conjugate Cosh Remainder "
                  "Erf ErfInv Exp Floor Log Log1p LogicalNot Negative Round Sigmoid Sign Sin Sinh Square "
                  "Sqrt Tan Tanh Expm1 Real Imag BitwiseInvert".split())
BINARY = frozenset("Add Divide Equal Greater GreaterEqual Less LessEqual LogicalAnd LogicalOr LogAddExp "
                   "Maximum Minimum Multiply NotEqual Power Subtract BitwiseBinary ArcTan2".split())
ELEMENTWISE = UNARY | BINARY | {"Select"}
FUSABLE = ELEMENTWISE | {"Broadcast"}
VIEWS = frozenset({"Broadcast", "Slice", "Transpose", "ExpandDims", "Squeeze", "AsStrided", "StopGradient",
                   "Copy"})
RESHAPES = frozenset({"Reshape", "Flatten", "Unflatten"})
UPDATES = frozenset({"SliceUpdate", "ScatterAxis", "Scatter"})
"""Copy their first input (or take its buffer), then write into it: two dispatches."""
MAX_COMPILE_DEPTH, MAX_COMPILE_ARRAYS = 11, 24  # mlx/compile.cpp
SLOW = frozenset("Exp Sigmoid Sin Cos Log Log1p Tanh Erf ErfInv LogAddExp Power Expm1 Softmax "
                 "LogSumExp".split())
"""Ops MLX's CPU backend computes per element in scalar code (measured ~20 ns an element here)."""
CPU = dict(main=10e-6, dispatch=1e-6, flops=28e9, bandwidth=12e9, slow=20e-9, fused_op=0.1e-9)
"""What the run-ahead timing uses, measured on this machine's CPU backend (2026-12-03, OpenBLAS):
the main thread's time per array (4,000 chained tiny ops: 9.5-11.7 us each), a dispatch's own cost,
matmul FLOP/s (24-41 GFLOP/s from 32-wide to 2048-wide), element-wise bandwidth (0.6 ns a float32
multiply or add), exp/sigmoid/softmax per element (19-24 ns), and each extra op of a fused kernel."""


@dataclass
class _Array:
    shape: tuple
    dtype: object
    prim: "_Prim | None" = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass(eq=False)
class _Prim:
    name: str
    inputs: list[str]
    outputs: list[str]
    args: list
    custom: bool = False


def _build(traced) -> tuple[dict[str, _Array], list[_Prim]]:
    arrays = {n: _Array(tuple(s), t) for n, s, t in traced.inputs}
    arrays.update({n: _Array(tuple(v.shape), v.dtype) for n, v in traced.constants})
    prims = []
    for r in traced.prims:
        p = _Prim(r["name"], [i[0] for i in r["inputs"]], [o[0] for o in r["outputs"]], r["arguments"],
                  r.get("custom", False))
        for n, s, t in r["outputs"]:
            arrays[n] = _Array(tuple(s), t, p)
        prims.append(p)
    return arrays, prims


def fuse(arrays: dict[str, _Array], prims: list[_Prim], outputs: list[str]) -> list[_Prim]:
    """mx.compile's kernel fusion over one compiled function's primitives (in tape order)."""
    out_set, mine = set(outputs), {o for p in prims for o in p.outputs}
    parents: dict[str, list[str]] = {}
    for p in prims:
        for i in p.inputs:
            parents.setdefault(i, []).extend(p.outputs)
    fused_away: set[str] = set()
    tape: list[_Prim] = []
    for p in reversed(prims):
        root = p.outputs[0]
        if root in fused_away:
            continue
        group: set[str] = set()
        inputs: set[str] = set()
        split: dict[str, str] = {}

        def fusable(n: str) -> bool:
            q = arrays[n].prim
            return (q is not None and len(q.outputs) == 1 and q.name in FUSABLE
                    and (n in mine or n in split.values()))

        def visit(n: str, depth: int, shape: tuple) -> None:
            if n in group:
                return
            q = arrays[n].prim
            if depth >= MAX_COMPILE_DEPTH or not fusable(n) or (n in out_set and arrays[n].shape != shape):
                inputs.add(n)
                return
            if depth and not all(c in group for c in parents.get(n, [])):
                if q.name == "Broadcast" and len(inputs) < MAX_COMPILE_ARRAYS:
                    copy = f"{n}'{len(arrays)}"  # a copy of the broadcast joins; the original stays
                    arrays[copy] = _Array(arrays[n].shape, arrays[n].dtype, q)
                    split[n] = copy
                    for i in q.inputs:
                        parents.setdefault(i, []).append(copy)
                    visit(copy, depth, shape)
                else:
                    inputs.add(n)
                return
            (inputs.add if n in out_set else inputs.discard)(n)
            if len(inputs) >= MAX_COMPILE_ARRAYS:
                return
            group.add(n)
            for i in q.inputs:
                visit(i, depth + 1, shape)

        if p.name != "Broadcast" and len(p.outputs) == 1:
            visit(root, 0, arrays[root].shape)
        if len(group) <= 1:
            tape.append(p)
            continue
        order, ins, done = [], [], set()

        def collect(n: str) -> None:  # members in topological order, inputs in first-use order
            if n not in group:
                if n not in ins:
                    ins.append(n)
                return
            if n in done:
                return
            done.add(n)
            for i in arrays[n].prim.inputs:
                collect(split[i] if split.get(i) in group else i)
            order.append(n)

        collect(root)
        outs = [n for n in order[:-1] if n in out_set] + [root]
        fused_away.update(order[:-1])
        kernel = _Prim("Compiled", ins, outs, [arrays[n].prim.name for n in order])
        for n in outs:
            arrays[n].prim = kernel
        for i in ins:
            parents[i] = [c for c in parents.get(i, []) if c not in group] + outs
        tape.append(kernel)
    tape.reverse()
    return tape


def _contiguous(p: _Prim, arrays: dict[str, _Array], contiguous: dict[str, bool]) -> bool:
    """Whether a view is still row-contiguous (a reshape of it is then a view, not a copy)."""
    src, out = arrays[p.inputs[0]], arrays[p.outputs[0]]
    if not contiguous[p.inputs[0]]:
        return False
    if p.name == "Transpose":
        moved = [ax for ax in p.args[0] if src.shape[ax] != 1]
        return moved == sorted(moved)
    if p.name == "Broadcast":
        return math.prod(src.shape) == math.prod(out.shape)
    if p.name == "Slice":
        cut = [d for d in range(len(out.shape)) if out.shape[d] != src.shape[d]]
        return not cut or (len(cut) == 1 and all(out.shape[d] == 1 for d in range(cut[0])))
    return True


def to_graph(arrays: dict[str, _Array], prims: list[_Prim], outputs: list[str]):
    """The step as a schedule._Graph, the index of each output, and the array each node is."""
    g = schedule._Graph()
    index: dict[str, int] = {}
    contiguous: dict[str, bool] = {}
    names: list[str] = []

    def add(inputs, nbytes, name, **kw) -> int:
        names.append(name)
        return g.op(inputs, nbytes, **kw)

    for n, a in arrays.items():
        if a.prim is None and "'" not in n:
            index[n] = add([], a.nbytes, n, evaluated=True)
            contiguous[n] = True
    for p in prims:
        ins = [index[i] for i in p.inputs]
        if p.name in VIEWS or (p.name in RESHAPES and contiguous[p.inputs[0]]):
            index[p.outputs[0]] = add(ins, 0, p.outputs[0], dispatches=0, evaluated=False)
            g.buffer[-1] = g.buffer[ins[0]]
            contiguous[p.outputs[0]] = _contiguous(p, arrays, contiguous)
            continue
        if p.name == "Depends":  # views; a custom function's outputs view its last inputs
            offset = len(ins) - len(p.outputs) if p.custom else 0
            for k, o in enumerate(p.outputs):
                index[o] = add(ins, 0, o, dispatches=0, evaluated=False)
                g.buffer[-1] = g.buffer[ins[offset + k]]
                g.group[-1] = index[p.outputs[0]]
                contiguous[o] = contiguous[p.inputs[offset + k]]
            continue
        donors: tuple[int, ...] = ()
        if p.name in ELEMENTWISE or p.name == "Compiled":
            donors = tuple(range(len(ins)))
        elif p.name in UPDATES or p.name == "Softmax":
            donors = (0,)
        for k, o in enumerate(p.outputs):  # each output its own buffer, each may take a donor's
            out = arrays[o]
            mine = tuple(j for j in donors if contiguous[p.inputs[j]]
                         and arrays[p.inputs[j]].nbytes == out.nbytes
                         and arrays[p.inputs[j]].dtype.size == out.dtype.size
                         and arrays[p.inputs[j]].nbytes > 16)
            index[o] = add(ins, out.nbytes, o, donors=mine, evaluated=False,
                           dispatches=0 if k else (2 if p.name in UPDATES else 1))
            g.group[-1] = index[p.outputs[0]]
            contiguous[o] = True
    return g, [index[o] for o in outputs], names


def _cost(p: _Prim, arrays: dict[str, _Array], c: dict = CPU) -> float:
    """Seconds the worker spends on primitive `p` (see CPU)."""
    out, ins = arrays[p.outputs[0]], [arrays[i] for i in p.inputs]
    n = math.prod(out.shape)
    moved = sum(a.nbytes for a in ins) + sum(arrays[o].nbytes for o in p.outputs)
    if p.name in ("Matmul", "QuantizedMatmul", "GatherMM", "GatherQMM", "AddMM") and ins:
        return 2 * n * ins[0].shape[-1] / c["flops"]
    if p.name == "Compiled":
        slow = sum(op in SLOW for op in p.args)
        return n * (slow * c["slow"] + (len(p.args) - slow) * c["fused_op"]) + moved / c["bandwidth"]
    if p.name in SLOW:
        return max(n, math.prod(ins[0].shape) if ins else 0) * c["slow"]
    return moved / c["bandwidth"]


@dataclass
class StepReplay:
    """The replayed step: its peak above the evaluated inputs, and what is alive at that peak."""

    peak_bytes: int
    alive: dict[str, int]
    """Bytes alive at the peak by kind (KINDS)."""
    n_ops: int


def replay(traced, width: int = schedule.BFS_MAX_WIDTH, run_ahead: int = schedule.RUN_AHEAD,
           timed: bool = True) -> StepReplay:
    """Fuse the micro-step and the update separately, order the step as eval_impl does, replay it
    with the run-ahead timed (`timed`) or a fixed window of `run_ahead` dispatches."""
    arrays, prims = _build(traced)
    produced = {o: p for p in prims for o in p.outputs}
    micro, stack = set(), list(traced.micro_outputs)
    while stack:  # the micro-step: what its outputs depend on
        p = produced.get(stack.pop())
        if p is not None and p not in micro:
            micro.add(p)
            stack.extend(p.inputs)
    tape = fuse(arrays, [p for p in prims if p in micro], traced.micro_outputs)
    tape += fuse(arrays, [p for p in prims if p not in micro], traced.outputs)
    g, outputs, names = to_graph(arrays, tape, traced.outputs)
    order = schedule._tape(g, outputs, width)
    if timed:
        costs = [0.0] * len(names)
        for i, n in enumerate(names):
            p = arrays[n].prim
            if p is not None and g.dispatches[i]:
                costs[i] = _cost(p, arrays)
        result = schedule._replay_timed(g, order, outputs, costs, CPU["main"], CPU["dispatch"])
    else:
        result = schedule._replay(g, order, outputs, run_ahead)
    forward, stack = set(), [traced.micro_outputs[0]]
    while stack:  # what the loss value depends on: the forward pass
        n = stack.pop()
        if n not in forward:
            forward.add(n)
            p = arrays[n].prim
            stack.extend(p.inputs if p is not None else [])
    grads, updated = set(traced.micro_outputs[2:]), set(traced.outputs)
    alive = dict.fromkeys(KINDS, 0)
    for nbytes, b in result.alive_at_peak():
        alive[_kind(names[b], arrays[names[b]].shape, grads, updated, forward, traced)] += int(nbytes)
    return StepReplay(int(result.peak), alive, len(tape))


KINDS = ("gradients", "activations", "attention scores", "backward working set", "logits and loss",
         "optimizer update")


def _kind(name: str, shape: tuple, grads: set[str], updated: set[str], forward: set[str], traced) -> str:
    """Which breakdown line a buffer alive at the peak belongs to, by what it is and its shape."""
    if name in grads:
        return "gradients"
    if name in updated:
        return "optimizer update"
    if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] in (traced.positions, traced.positions + 1):
        return "attention scores"
    if shape and shape[-1] == traced.vocab:
        return "logits and loss"
    return "activations" if name in forward else "backward working set"


def replay_estimate(shape, st):
    """The planner's estimate from the replayed graph: the evaluated inputs plus the step's peak,
    broken down by what is alive at that peak.

    Raises:
        trace.TraceError: the step cannot be traced (then the formula answers: `planner.formula`).
    """
    from .formula import update_floor
    from .settings import HEADROOM_FIXED, HEADROOM_FRACTION, Estimate, model_notes, trainable_params
    from .trace import TraceError, build_model, trace_step

    if shape.config is None:
        raise TraceError("no config.json to build the model from")
    if st.loss_impl != "mlx_ft":
        raise TraceError("the replay traces mlx_ft's loss only")
    traced = trace_step(build_model(shape, st, shape.config), st)
    step = replay(traced)
    breakdown = {**traced.inputs_breakdown, **step.alive}
    peak = sum(breakdown.values())
    # The update phase of full fine-tuning measured 13-18 % above the replayed step (something is
    # held between steps that one step's graph does not show; grid rows 72-74): where the
    # formula's update phase is its peak, that phase is a floor (docs/planner.md).
    floor = update_floor(shape, st)
    if floor > peak:
        breakdown["optimizer update (formula)"] = floor - peak
        peak = floor
    return Estimate(breakdown=breakdown, peak_bytes=int(peak),
                    headroom_bytes=int(HEADROOM_FIXED + HEADROOM_FRACTION * peak),
                    trainable_params=trainable_params(shape, st), total_params=shape.total_params(),
                    notes=model_notes(shape, st), memory_model=f"replayed graph ({step.n_ops:,} ops)")

"""What MLX holds at once while it evaluates the chunked loss: a small model of its evaluator.

The fused loss (mlx_ft.losses._fused_chunk) frees each chunk's logits once the chunk is done, yet
several chunks' logits are alive at the peak. Two mechanisms of MLX's `eval_impl`
(mlx/transforms.cpp) and its CPU stream decide how many:

1. **Tape order.** `eval_impl` orders the graph breadth-first from its outputs, with at most
   BFS_MAX_WIDTH arrays queued (beyond that it goes depth-first), and runs that tape in reverse.
   mx.compile fuses the chain of adds that sums the chunk losses (and the one that sums their
   dL/dh) into kernels of up to COMPILE_MAX_DEPTH adds, so up to eleven chunks are inputs of the
   same node and sit side by side in the breadth-first order: their ops interleave instead of one
   chunk finishing before the next starts.
2. **Run-ahead.** The main thread walks the tape, allocating each op's output and handing its work
   to the stream's worker thread; it waits only when more than MAX_ACTIVE_TASKS tasks of
   DISPATCHES_PER_TASK dispatches are in flight (every op dispatches its computation, if it has
   one, and then a release of its inputs: mlx/backend/cpu/eval.cpp). A buffer is freed when the
   worker releases its last consumer, so the outputs of the next ~110 dispatches are alive on top
   of what the worker is using.

`loss_peak_bytes` builds the compiled loss graph of one step (the same primitives, in the same
order, as MLX 0.32's compiled `_fused_chunk`, read from `mx.export_to_dot`), orders it as
`eval_impl` does, and replays it with the worker a full window behind the main thread (the loss's
matmuls and softmaxes take far longer than dispatching them). Pure Python, no mlx import.
"""

from __future__ import annotations

from functools import lru_cache

BFS_MAX_WIDTH = 20
"""mlx/utils.h: env::bfs_max_width(), MLX_BFS_MAX_WIDTH, default 20."""
MAX_ACTIVE_TASKS = 10
"""mlx/transforms.cpp: eval_impl waits for a task when more than this many are in flight."""
DISPATCHES_PER_TASK = 10
"""mlx/backend/cpu/encoder.h: every 10 dispatches to the CPU stream form one scheduler task."""
RUN_AHEAD = (MAX_ACTIVE_TASKS + 1) * DISPATCHES_PER_TASK
"""Dispatches the main thread can be ahead of the worker before it waits."""
COMPILE_MAX_DEPTH = 11
"""mlx/compile.cpp: max_compile_depth, the most element-wise ops fused into one kernel."""


class _Graph:
    """Arrays of a lazy graph: inputs (indices), bytes of the buffer it allocates, the array whose
    buffer it shares (a view), how many computations it dispatches, which inputs it may take
    the buffer of (MLX donates an input's buffer to an element-wise output of the same size when
    nothing else holds it), and whether it is already evaluated (the step's inputs and
    parameters: by default, the arrays with no inputs)."""

    def __init__(self):
        self.inputs: list[list[int]] = []
        self.nbytes: list[float] = []
        self.buffer: list[int] = []
        self.dispatches: list[int] = []
        self.donors: list[tuple[int, ...]] = []
        self.evaluated: list[bool] = []
        self.group: list[int] = []
        """The first output of the primitive that made this array: eval_impl orders a primitive's
        outputs (siblings) as one array."""

    def op(self, inputs: list[int], nbytes: float, donors: tuple[int, ...] = (), dispatches: int = 1,
           evaluated: bool | None = None) -> int:
        i = len(self.inputs)
        self.inputs.append(inputs)
        self.nbytes.append(nbytes)
        self.buffer.append(i)
        self.dispatches.append(dispatches)
        self.donors.append(donors)
        self.evaluated.append(not inputs if evaluated is None else evaluated)
        self.group.append(i)
        return i

    def view(self, inputs: list[int], of: int | None = None) -> int:
        i = self.op(inputs, 0, dispatches=0)
        self.buffer[i] = self.buffer[inputs[0] if of is None else of]
        return i


def _loss_graph(B: int, n: int, step: int, V: int, D: int, s: int) -> tuple[_Graph, list[int]]:
    """The compiled graph of loss_sum and its dL/dh for one row batch: n positions, chunks of `step`
    positions, vocabulary V, hidden D, model dtype of s bytes. Returns the graph and its outputs."""
    g = _Graph()
    h = g.op([], B * n * D * s)  # the final norm's output [B, n, D]
    targets, weights = g.op([], 0), g.op([], B * n * 4)
    head_t = g.view([g.op([], 0)])  # the head's weight, transposed (a view)
    head_tt = g.view([head_t])
    one = g.view([g.op([], 0)])  # the cotangent 1.0, expanded
    zeros: dict[int, int] = {}  # compile merges the zeros of equal-sized chunks into one array
    cts, sizes = [], []
    for start in range(0, n, step):
        c = min(step, n - start)
        e = B * c * V  # logits entries of this chunk
        hc = g.view([h])  # Slice
        flat = g.view([hc]) if B == 1 else g.op([hc], B * c * D * s)  # Flatten (a copy across rows)
        logits = g.view([g.op([flat, head_t], e * s)])  # Matmul, Unflatten
        if s != 4:
            logits = g.op([logits], e * 4)  # AsType float32
        top = g.op([logits], B * c * 4)  # Max
        shifted = g.op([logits, top], e * 4, donors=(0,))  # logits - max
        lse = g.view([g.op([shifted], B * c * 4)])  # LogSumExp, Squeeze
        t = g.view([g.view([targets])])  # Slice, ExpandDims
        picked = g.view([g.op([shifted, t], B * c * 4)])  # GatherAxis, Squeeze
        w = g.view([weights])  # Slice
        ce = g.op([lse, picked, w], B * c * 4)  # (lse - picked) * w
        loss = g.view([g.op([ce], 4)])  # Sum, Squeeze
        if c not in zeros:
            zeros[c] = g.op([g.view([g.op([], 0)])], e * 4)  # Broadcast, Full
        wc = g.op([w, one], B * c * 4)
        neg = g.view([g.op([wc], B * c * 4)])  # Negative, ExpandDims
        # ScatterAxis: copy, scatter -w
        scattered = g.op([zeros[c], t, neg], e * 4, donors=(0,), dispatches=2)
        soft = g.op([shifted], e * 4, donors=(0,))  # Softmax
        # w * softmax + scattered, in the model dtype: takes an input's buffer only in float32
        dlogits = g.view([g.op([scattered, g.view([wc]), soft], e * s, donors=(0, 2) if s == 4 else ())])
        dh = g.view([g.op([dlogits, head_tt], B * c * D * s)])  # Matmul, Unflatten
        cts.append(g.view([hc, loss, dh], of=dh))  # CustomTransforms: (loss, dL/dh_c)
        sizes.append(c)

    def fused_sum(terms: list[int], first: int | None, nbytes: float) -> int:
        # a chain of adds, fused COMPILE_MAX_DEPTH at a time from the output end
        chain = ([first] if first is not None else []) + terms
        adds = len(chain) - 1
        if not adds:
            return chain[0]
        k = adds % COMPILE_MAX_DEPTH or COMPILE_MAX_DEPTH
        acc = g.op(chain[:k + 1], nbytes, donors=tuple(range(k + 1)))
        for i in range(k + 1, len(chain), COMPILE_MAX_DEPTH):
            part = [acc] + chain[i:i + COMPILE_MAX_DEPTH]
            acc = g.op(part, nbytes, donors=tuple(range(len(part))))
        return acc

    total = fused_sum(cts, g.op([], 0), 4)
    # Backward: each chunk's dL/dh scaled by the incoming cotangent and slice-updated into a zero
    # [B, n, D] array (the vjp of slicing h), summed last chunk first.
    hzeros = g.op([g.view([g.op([], 0)])], B * n * D * s)
    updates = [g.op([hzeros, g.op([one, ct], B * c * D * s)], B * n * D * s, donors=(0,), dispatches=2)
               for ct, c in zip(cts, sizes)]
    dh_total = fused_sum(updates[::-1], None, B * n * D * s)
    return g, [total, dh_total]


def _tape(g: _Graph, outputs: list[int], width: int = BFS_MAX_WIDTH) -> list[int]:
    """eval_impl's order: degrees from a depth-first pass, then breadth-first from the outputs with at
    most `width` unexpanded arrays queued (deferring the rest to a stack), run in reverse."""
    sync = len(g.inputs)
    rep = g.group
    inputs = [[rep[q] for q in ins] for ins in g.inputs] + [[rep[q] for q in outputs]]
    deg = [0] * (sync + 1)
    seen, stack = {sync}, [sync]
    while stack:
        a = stack.pop()
        for q in inputs[a]:
            if _scheduled(g, q):
                continue
            deg[q] += 1
            if q not in seen:
                seen.add(q)
                stack.append(q)
    tape, dfs, i = [sync], [], 0
    while i < len(tape) or dfs:
        if i >= len(tape):
            a, j = dfs.pop()
        else:
            a, j = tape[i], 0
            i += 1
        while j < len(inputs[a]):
            q = inputs[a][j]
            if not _scheduled(g, q):
                if len(tape) - i >= width:
                    dfs.append((a, j))
                    break
                deg[q] -= 1
                if deg[q] == 0:
                    tape.append(q)
            j += 1
    siblings: dict[int, list[int]] = {}
    for a, r in enumerate(rep):
        if r != a:
            siblings.setdefault(r, []).append(a)
    return [s for a in reversed(tape) if a != sync for s in [a, *siblings.get(a, [])]]


def _scheduled(g: _Graph, i: int) -> bool:
    return g.evaluated[i]


class Replayed:
    """What `_replay` found: the peak, what is alive at the end, and every buffer's life."""

    def __init__(self, peak: float, end: float, spans: list[tuple[float, float, float, int]], at: float):
        self.peak, self.end = peak, end
        self.spans = spans
        """(allocated, freed by the worker, bytes, owning array), in dispatches or seconds."""
        self.at = at
        """When the peak is first reached."""

    def alive_at_peak(self) -> list[tuple[float, int]]:
        """(bytes, owning array) of the buffers alive at the peak."""
        return [(nb, b) for s, e, nb, b in self.spans if s <= self.at < e]


class _Buffers:
    """Which buffer each array of `order` uses while a replay hands buffers on by donation."""

    def __init__(self, g: _Graph, order: list[int], outputs: list[int]):
        self.g = g
        self.pos = {a: i for i, a in enumerate(order)}
        self.consumers: dict[int, list[int]] = {}
        for a in order:
            for q in set(g.inputs[a]):
                self.consumers.setdefault(q, []).append(a)
        self.owner = list(g.buffer)  # array -> the array whose buffer it uses
        self.members: dict[int, list[int]] = {}
        for a in range(len(g.inputs)):
            self.members.setdefault(self.owner[a], []).append(a)
        self.outs = set(outputs)

    def readers(self, b: int) -> list[int]:
        return [c for m in self.members[b] for c in self.consumers.get(m, [])]

    def donate(self, a: int, released) -> None:
        """Give `a` a donor input's buffer when no other array holds it: `a` is its last reader
        and every other reader's release has run on the worker (`released(c)`). A reader whose
        output took the buffer does not hold it in its release (mlx/backend/cpu eval)."""
        for j in self.g.donors[a]:
            b = self.owner[self.g.inputs[a][j]]
            if self.g.evaluated[b] or any(m in self.outs for m in self.members[b]):
                continue
            readers = self.readers(b)
            if max(readers, key=self.pos.__getitem__) != a:  # a later op still reads it
                continue
            if all(c == a or c in self.members[b] or released(c) for c in readers):
                for m in self.members.pop(a):
                    self.owner[m] = b
                    self.members[b].append(m)
                return

    def spans(self, start: dict, freed: dict, end: float) -> list[tuple[float, float, float, int]]:
        """(allocated, freed, bytes, owning array) of every buffer: freed once the last reader's
        release has run (`freed`), outputs at `end`."""
        out = []
        for b, ms in self.members.items():
            if b not in start or not self.g.nbytes[b]:
                continue
            if any(m in self.outs for m in ms):
                gone = end
            else:
                gone = max([freed[c] for m in ms for c in self.consumers.get(m, [])] + [freed[b]])
            out.append((start[b], gone, self.g.nbytes[b], b))
        return out


def _peak(spans: list[tuple[float, float, float, int]]) -> tuple[float, float]:
    """(peak bytes alive, when it is first reached) over the spans' lives."""
    import numpy as np

    times = np.array(sorted({s for s, _, _, _ in spans} | {e for _, e, _, _ in spans}))
    if not len(times):
        return 0.0, 0.0
    delta = np.zeros(len(times) + 1)
    for s, e, nb, _ in spans:
        delta[np.searchsorted(times, s)] += nb
        delta[np.searchsorted(times, e)] -= nb
    alive = np.cumsum(delta)[:-1]
    k = int(alive.argmax())
    return float(alive[k]), float(times[k])


def _replay(g: _Graph, order: list[int], outputs: list[int], run_ahead: int) -> Replayed:
    """Replay `order` when the main thread allocates at dispatch and the worker, `run_ahead`
    dispatches behind, frees a buffer once it has run the release of the buffer's last consumer.
    Lives are in dispatches."""
    first, release = {}, {}  # array -> its first dispatch, its release dispatch
    k = 0
    for a in order:
        first[a] = k
        k += g.dispatches[a]
        release[a] = k
        k += 1
    bufs = _Buffers(g, order, outputs)
    for a in order:
        done = first[a] - run_ahead  # the worker has run every dispatch before this one
        bufs.donate(a, lambda c: release[c] < done)
    spans = bufs.spans(first, {a: r + run_ahead for a, r in release.items()}, k + run_ahead)
    peak, at = _peak(spans)
    end = sum(nb for s, e, nb, _ in spans if s <= k - 1 < e)  # alive when the last op is dispatched
    return Replayed(peak, float(end), spans, at)


def _replay_timed(g: _Graph, order: list[int], outputs: list[int], cost: list[float], main_seconds: float,
                  dispatch_seconds: float) -> Replayed:
    """`_replay` with the run-ahead timed instead of fixed: the main thread spends `main_seconds`
    per array and enqueues its dispatches; the worker runs them in order (`cost[a]` seconds for an
    array's computation, `dispatch_seconds` for each dispatch), and every DISPATCHES_PER_TASK-th
    dispatch counts as a task; after each array the main thread waits for the oldest task while
    more than MAX_ACTIVE_TASKS are unfinished (mlx/backend/cpu/encoder.h, eval_impl). With slow
    ops the main thread runs a full window ahead (`_replay`'s RUN_AHEAD); with fast ones the
    worker keeps up and less is alive at once. Lives are in seconds; `end` is not computed (0)."""
    import heapq

    bufs = _Buffers(g, order, outputs)
    t = worker = 0.0
    released: dict[int, float] = {}  # array -> when the worker ran its release
    tasks: list[float] = []  # finish times of unfinished tasks (heap)
    n = 0
    alloc: dict[int, float] = {}
    for a in order:
        t += main_seconds
        bufs.donate(a, lambda c: released.get(c, float("inf")) <= t)
        alloc[a] = t
        steps = ([cost[a] / max(g.dispatches[a], 1) + dispatch_seconds] * g.dispatches[a]
                 + [dispatch_seconds / 2])
        for c in steps:
            worker = max(worker, t) + c
            n += 1
            if n % DISPATCHES_PER_TASK == 0:
                heapq.heappush(tasks, worker)
        released[a] = worker
        while tasks and tasks[0] <= t:
            heapq.heappop(tasks)
        if len(tasks) > MAX_ACTIVE_TASKS:
            t = max(t, heapq.heappop(tasks))
    spans = bufs.spans(alloc, released, max(worker, t) + 1)
    peak, at = _peak(spans)
    return Replayed(peak, 0.0, spans, at)


@lru_cache(maxsize=256)
def loss_bytes(B: int, n: int, step: int, V: int, D: int, s: int, width: int = BFS_MAX_WIDTH,
               run_ahead: int = RUN_AHEAD) -> tuple[float, float]:
    """(peak, end): the bytes the loss's own arrays take at their peak while MLX evaluates the loss
    (logits chunks in flight, the [B, n, D] dL/dh slices being summed), and those still alive when
    its last op is dispatched, where the backward pass through the blocks starts allocating. One
    chunk peaks at its end; several interleaved chunks peak before it. `n` positions per row,
    chunks of `step`."""
    g, outputs = _loss_graph(B, n, step, V, D, s)
    r = _replay(g, _tape(g, outputs, width), outputs, run_ahead)
    return r.peak, r.end


def loss_peak_bytes(B: int, n: int, step: int, V: int, D: int, s: int, width: int = BFS_MAX_WIDTH,
                    run_ahead: int = RUN_AHEAD) -> float:
    """The peak of `loss_bytes`."""
    return loss_bytes(B, n, step, V, D, s, width, run_ahead)[0]

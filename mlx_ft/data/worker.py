"""Rendering worker processes (`python -c` running `worker.main`), fed chunks over a pipe.

`Workers` renders a file's chunks in order, in this process (n = 0) or in a `Pool` of workers.
Plain subprocesses rather than multiprocessing: a spawned multiprocessing worker re-imports the
user's main script, which breaks every script that calls `mlx_ft.train()` without an
`if __name__ == "__main__":` guard (and forking next to a loaded MLX/Metal runtime is unsafe).
These import only mlx_ft's data modules and the tokenizer's libraries.

Protocol, each message a pickle preceded by its length (8 bytes, little-endian): the renderer,
then `(job, part)` per chunk, answered by `("ok", chunk)` or `("error", exception)`; `None` ends.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

from ..errors import DataError
from .build import render_job


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class Pool:
    """`n` worker processes; `map` renders parts in order, one in flight per worker."""

    def __init__(self, renderer, n: int):
        # One process per core already: no tokenizer thread pool. The parent's sys.path, so a
        # notebook that made mlx_ft importable by editing sys.path has workers that find it too.
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        renderer_bytes = pickle.dumps(renderer)
        # -c, not -m mlx_ft.data.worker: the package imports this module before runpy would run it,
        # which Python warns about on every start.
        start = "from mlx_ft.data.worker import main; main()"
        self.procs = [subprocess.Popen([sys.executable, "-c", start], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(n)]
        for p in self.procs:
            _send(p.stdin, renderer_bytes)

    def map(self, job, parts) -> Iterator[tuple]:
        """(part, its rendered chunk) for each part, in order; at most 2 results wait per worker."""
        parts = iter(parts)
        lock, ready = threading.Lock(), threading.Condition()
        results: dict[int, tuple] = {}
        state = {"next": 0, "taken": 0, "done": False, "stop": False}
        limit = 2 * len(self.procs)

        def feed(proc):
            while True:
                with ready:  # keep memory bounded: do not run far ahead of what is consumed
                    ready.wait_for(lambda: state["stop"] or state["taken"] - state["next"] < limit)
                    if state["stop"]:
                        return
                with lock:
                    if state["done"]:
                        return
                    try:
                        part = next(parts)
                    except StopIteration:
                        state["done"] = True
                        return
                    except BaseException as e:  # reading the file failed: report it in order
                        state["done"] = True
                        part, k = None, state["taken"]
                        state["taken"] += 1
                        with ready:
                            results[k] = (None, ("error", e))
                            ready.notify_all()
                        return
                    k = state["taken"]
                    state["taken"] += 1
                try:
                    _send(proc.stdin, (job, part))
                    answer = _recv(proc.stdout)
                except (EOFError, OSError):
                    answer = ("error", DataError(
                        f"a data rendering process (pid {proc.pid}) died; set MLX_FT_DATA_WORKERS=0 to "
                        "render in this process and see why"))
                with ready:
                    results[k] = (part, answer)
                    ready.notify_all()
                if answer[0] != "ok":
                    return

        threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in self.procs]
        for t in threads:
            t.start()
        try:
            while True:
                with ready:
                    ready.wait_for(lambda: state["next"] in results or
                                   (state["done"] and state["next"] >= state["taken"]) or
                                   not any(t.is_alive() for t in threads))
                    if state["next"] not in results:
                        if state["done"] and state["next"] >= state["taken"]:
                            return
                        raise DataError("data rendering processes stopped unexpectedly; set "
                                        "MLX_FT_DATA_WORKERS=0 to render in this process")
                    part, answer = results.pop(state["next"])
                    state["next"] += 1
                    ready.notify_all()
                if answer[0] != "ok":
                    raise answer[1]
                yield part, answer[1]
        finally:
            with ready:
                state["stop"] = True
                ready.notify_all()
            for t in threads:
                t.join()

    def close(self) -> None:
        for p in self.procs:
            try:
                _send(p.stdin, None)
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()


def default_workers() -> int:
    """MLX_FT_DATA_WORKERS, else the cores this process may run on."""
    env = os.environ.get("MLX_FT_DATA_WORKERS")
    if env is not None:
        return max(0, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class Workers:
    """Rendering processes (`worker.Pool`), started on first use and shared by every file of a
    load; with n = 0 chunks are rendered in this process."""

    def __init__(self, renderer, n: int):
        self.renderer, self.n, self.pool = renderer, n, None

    def map(self, job, parts):
        """(part, its rendered chunk) for each of `parts`, in order."""
        if self.n == 0:
            for part in parts:
                yield part, render_job(job, part, self.renderer)
            return
        if self.pool is None:
            self.pool = Pool(self.renderer, self.n)
        yield from self.pool.map(job, parts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def main() -> None:
    """The worker loop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes us
    # The pipe to the parent is the protocol: anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    renderer = pickle.loads(_recv(inp))
    while True:
        try:
            msg = _recv(inp)
        except EOFError:
            return
        if msg is None:
            return
        job, part = msg
        try:
            answer = ("ok", render_job(job, part, renderer))
        except DataError as e:
            answer = ("error", e)
        except Exception as e:  # a bug: hand it over with its traceback
            import traceback

            answer = ("error", RuntimeError(f"data rendering process failed:\n{traceback.format_exc()}"))
            del e
        _send(out, answer)


if __name__ == "__main__":
    main()

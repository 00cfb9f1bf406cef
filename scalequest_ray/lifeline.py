"""A vLLM general plugin (entry point `vllm.general_plugins`): a process vLLM spawns (a replica's
EngineCore, an executor's workers) ends when the process that spawned it ends, however that one
ended.

Why: a Ray Data LLM replica is a Ray actor whose AsyncLLM spawns the EngineCore as a child
process. When a driver that started its own local Ray is killed (SIGKILL, the OOM killer), its
raylet dies with it (Ray's fate sharing) and the actor's worker exits, but nothing tells the
EngineCore: vLLM 0.32 has no parent-death check, its ZMQ sockets quietly wait to reconnect, and
its busy loop kept stepping the requests it had admitted, reparented to init, spinning a core
(seen after a CI run). Ray's own clean-ups of a worker's children (kill_child_processes_on_worker_exit,
the raylet subreaper) need a worker that exits cleanly or a raylet that is still alive.

multiprocessing already gives every child a handle on its parent's death: the read end of the
spawn pipe, which reaches EOF when the parent exits for any reason. vLLM loads general plugins in
every process it starts (EngineCore.__init__, each worker), so this runs where it is needed; in a
process that is no multiprocessing child (the driver, a Ray worker) it does nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

GRACE_S = 10.0  # after SIGTERM (vLLM's own handler shuts the engine down), then SIGKILL

_watching = False


def install() -> None:
    """Watch this process's multiprocessing parent; when it is gone, end this process."""
    global _watching
    parent = multiprocessing.parent_process()
    if parent is None or _watching:
        return
    _watching = True
    threading.Thread(target=_watch, args=(parent,), name="scalequest-lifeline", daemon=True).start()


def _watch(parent) -> None:
    # Returns when the parent's end of the spawn pipe closes: the parent exited, or dropped its
    # Process object (vLLM holds its engine processes until it shuts them down itself).
    parent.join()
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Event().wait(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)  # still here: stuck where SIGTERM's handler never ran

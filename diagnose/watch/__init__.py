"""`diagnose watch`: follow a run while its trainer writes it, and act at a collapse's onset.

    from diagnose.watch import WatchConfig, WatchTarget, Watcher, run_watch
    w = Watcher(WatchTarget(Path("runs/x")))
    events = w.poll()        # [Event("step", ...), Event("episode", ...), ...]

Modules: `watcher` (one poll: stat walk, incremental `scan_run`, events), `display` (the status
line and the alert), `actions` (event log, episode report, the ``--on-collapse`` command and its
``DIAGNOSE_*`` variables), `loop` (`run_watch`). See docs/integrations.md ("Live").
"""

from diagnose.watch.loop import WatchConfig, run_watch
from diagnose.watch.watcher import Event, Watcher, WatchTarget

__all__ = ["Event", "WatchConfig", "WatchTarget", "Watcher", "run_watch"]

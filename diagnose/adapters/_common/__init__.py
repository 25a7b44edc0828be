"""What every adapter shares, one module per concern:

* ``issues``: `IssueLog` (deduplicated, capped per file) and `NonFinite`;
* ``values``: JSON number and step coercion;
* ``io``: file and folder listing, the first JSONL object, parquet checks, unreachable files;
* ``rollouts``: rollouts frames in the contract columns, list columns, group ids;
* ``metrics``: per-step metrics frames, name mapping, metrics derived from rollouts;
* ``turns``: `TurnClassifier` (memoised turn classification), tool names of a schema list;
* ``source``: `make_source` and the file fingerprint the scan cache keys on;
* ``hooks``: the defaults of the optional adapter hooks, and `the_run` (the run `load_run` chose);
* ``sidecar``: the live probe's run directory beside a foreign trainer's output.

A format's own helpers live in its package (``diagnose/adapters/<format>/``).
"""

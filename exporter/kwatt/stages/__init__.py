"""Energy stages: each source's readings -> component splits for the ledger.

``cpu`` (RAPL, hwmon or the model -> cpu/dram), ``gpu`` (kwatt.gpu_stage, re-exported so
that its module stays where other work edits it) and ``platform`` (a whole-node meter ->
`other`). The sampler runs them once per cycle; see docs/design in shared/design/stages.md.
"""

"""Energy stages: each source's readings -> component splits for the ledger.

- ``cpu``: RAPL, else hwmon (Grace, amd_energy), else the model -> cpu/dram splits by
  cgroup CPU time.
- ``gpu``: NVIDIA GPUs; the stage lives in kwatt.gpu_stage (re-exported here).
- ``platform``: whole-node meters -> the `other` component, given the cycle's cpu, dram
  and gpu splits.

The sampler runs them once per cycle (kwatt.sampler); StageResult and the stage protocols
are defined there.
"""

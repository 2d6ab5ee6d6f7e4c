"""csps.perf: performance models — hardware profiles (and the probe of this machine) and the cost
model that predicts a step's time from its FLOPs and bytes."""

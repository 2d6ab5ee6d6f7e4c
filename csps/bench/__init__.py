"""csps.bench: ``csps bench`` — real runs of the engine, the simulator, the cost model's validation
against real runs, the HTTP load generator, workloads, reports and plots. These tools watch the
engine through its step observers; nothing here patches it."""

"""csps.core: the torch-free heart of the engine — requests and sampling parameters, KV block pools
and the prefix cache, zigzag placement, the TP head layout, the stall-free scheduler, and the step
plans rank 0 sends to the ranks. Nothing here imports torch (``tests/test_scheduler.py`` checks)."""

"""Heterogeneity-adaptive scattering: cost model, planner, baselines (specs/adaptive-scattering.md).

Pure modules, no processes: ``costmodel`` (per-group time and memory), ``plan`` (the
versioned plan every rank validates), ``partition`` (bucketing, micro-batch chunking),
``levels`` (micro-batches built as levels), ``refine`` (search across micro-batches),
``greedy`` and ``milp`` (group assignment), ``planner`` (plan_step, lower_bound),
``baselines`` (static, batch-adaptive, greedy), ``workloads`` (model presets, long-tail
families), ``profiler`` (fits constants on a device; the only module that runs torch).
Running plans: ``capacity`` (the run's cost model and K), ``plan_source`` (rank 0's planner
process, or inline / forced / static plans), ``executor`` (broadcast, validation, and this rank's
micro-batches of a plan).
"""

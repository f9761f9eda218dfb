"""The run: `engine` (the `Predictor`: models set up once, one chunk through stage 1, stage 2
and the blend), `setup` (models, checks, device memory plan), `schedule` (the run loop and
the deadline's decisions), `batches` (batching by shape, out-of-memory halving), `chunk`
(what a chunk produces and observers see), `report` (``run_report.json``). The one call
around it is `rsna_infer.api.predict`."""

"""The pipeline stages, one module per stage, named as the stage (`gptpkg.pipeline`
registers them). Each module's `run(cfg, ctx)` reads its typed params section and its
declared inputs, writes its declared outputs, and returns its metrics. The library
(`gptpkg.*`) imports no stage."""

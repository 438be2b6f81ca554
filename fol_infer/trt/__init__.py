"""Everything that imports TensorRT or CUDA: loading it (`library`), building engines (`build`,
with the fp32 plan of `pins`), running them (`run`, with device memory from `memory`), and the
engine records a bundle's manifest keeps (`record`). Polygraphy's split: loaders build,
runners run. `export` asks this package for engines; the trt backend and the trt re-ranker
run them."""

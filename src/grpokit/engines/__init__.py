"""Models and generation: model loading, the `GenerationEngine` interface and its engines
(transformers in-process, vLLM), token sampling and CPU kernels for the sampler copy."""

"""The DiffusionBlocks method, blind to the task: blocks (the wrapper), the block-wise step, the sampler, AdamW."""

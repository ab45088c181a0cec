"""The names recording takes: what a store records (method), what a per-sample row holds (flavour), and how
per-sample gradients are computed (engine). One home for them; ``unlearn.runs.config`` re-exports them."""

# method: what a store records
PER_SAMPLE = "per-sample"  # a row per training sample, masked to p
ORIGINAL = "original"  # the original amnesiac method: every step's dense parameter change
LAYER = "layer"  # a fraction p of every step's change
RECORDING_METHODS = (PER_SAMPLE, ORIGINAL, LAYER)
STEP_METHODS = (ORIGINAL, LAYER)  # a row per step rather than per sample
KEEP_METHODS = (PER_SAMPLE, LAYER)  # p decides their rows' width

# flavour: what a per-sample row holds
GRAD = "grad"  # the sample's raw gradient (the seed's)
UPDATE = "update"  # the sample's share of the optimizer's step
FLAVOURS = (GRAD, UPDATE)

# engine: how per-sample gradients are computed
MASKED = "masked"  # in the user's backward, only the kept values
VMAP = "vmap"  # torch.func, full per-sample gradients (the reference)
ENGINES = (MASKED, VMAP)

"""The pieces put together with Lightning: data, model, training, evaluation, the run directory."""

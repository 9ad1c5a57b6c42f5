"""Pure transforms: per-image stacks, batch mixing, text, test-time views. Imports nothing else from transferkit."""

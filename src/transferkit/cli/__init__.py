"""The command line: parse arguments, call pipelines, print."""

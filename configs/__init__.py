"""ml-collections configs: one file per model family, sharing `common`."""

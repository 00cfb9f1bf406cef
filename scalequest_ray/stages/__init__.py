"""One module per pipeline stage. Each exposes `build(cfg, storage) -> ray.data.Dataset`."""

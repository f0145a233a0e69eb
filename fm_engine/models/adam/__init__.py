"""adam models (registered in fm_engine.models.registry on import)."""

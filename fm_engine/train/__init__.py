"""Training entry points (``fm-engine train``)."""

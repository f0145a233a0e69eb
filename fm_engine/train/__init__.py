"""Training entry points (``fm-engine train``, ``fm-engine convert-avit``).

* :mod:`fm_engine.train.config`: ``TrainConfig`` (every option; YAML / TOML files);
* :mod:`fm_engine.train.mjepa`: the M-JEPA loop (DDP / FSDP, autocast, checkpoints, resume);
* :mod:`fm_engine.train.convert`: ViT -> AViT checkpoint conversion;
* :mod:`fm_engine.train.demo`: the embedded demo job (two-stage recipe on synthetic DICOM);
* :mod:`fm_engine.train.cli`: the subcommands.

Nothing heavy is imported here: ``fm-engine --help`` stays fast.
"""

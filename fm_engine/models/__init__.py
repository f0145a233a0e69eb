"""Reference models of the five source codebases, built from fm_engine.nn modules.

Families: ``mitub`` (ViT, AViT), ``stcnnt`` (ST-CNNT backbones and task models), ``raddiffusion``,
``moco`` and ``adam``. Each family module registers its configurations in
:mod:`fm_engine.models.registry` when imported; :func:`fm_engine.create_model` imports them lazily.
"""

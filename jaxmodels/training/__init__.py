"""Training: the optax loop and everything a run writes.

- ``fit``: ``fit`` (a model, a data set and a ``TrainConfig`` to a trained run), training recipes,
  evaluation and parameter restore;
- ``steps``: the jitted train and eval steps and the train state;
- ``optim``: optimizers and learning-rate schedules by name (the CLI's names);
- ``parallel``: strategies over devices and hosts (single device, ``pmap``, sharded ``jit``,
  ``jax.distributed``);
- ``batches``: the deterministic, resumable batch order;
- ``checkpoint``: orbax checkpoints that resume exactly;
- ``rundir`` and ``runlog``: the run folder and its metrics log.

Imports ``jaxmodels.nn`` and ``jaxmodels.data``, never the reverse.
"""

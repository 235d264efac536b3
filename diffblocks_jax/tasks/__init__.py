"""Tasks: what is diffused and how it is scored. A task is one module here; `registry.py` maps each model kind to
its task (`registry.task_module(kind)` imports it). Every task module offers the same names, and the loop and `--mode=eval|sample` call nothing else:

  UNIT                                    what a progress line counts per second ('img', 'seq')
  make_task(config, data) -> task         the object the core's steps and sampler ask (target, loss, ...)
  partition(config, data=None)            the noise plan of its blocks (core/partitions.py)
  train_batch(key, rows, data_config)     -> (inputs, targets) of a step from gathered training rows
  make_train_step(graphdef, config, schedule, *, data, block=None, placement=...)
  make_evaluator(exp, workdir)            -> evaluate(params, step) -> (metrics, one log line)
  write_samples(exp, workdir, params, step, num) -> path   (--mode=sample; absent: the task has no samples)
  start_lines(exp) -> [str]               optional: what the log says about the plan when a run starts

`exp` is the run's `training.experiment.Experiment`: the resolved config, the data, the model's graphdef, the
run's random streams (`exp.key`), placement helpers and the loader of judging runs (`exp.load_judge`).
docs/architecture.md ("Adding a task") walks through a new one.
"""

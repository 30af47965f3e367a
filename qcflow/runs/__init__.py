"""Trained runs: find an earlier run, check it finished, resume it, load what it trained.

The layer between the Lightning modules (:mod:`qcflow.lit`) and the tasks: tasks and the score
command call down into it, and it hands the layers below loaded networks and densities, so
:mod:`qcflow.qc` never reads a run folder.

* :mod:`qcflow.runs.folders`: run folders, finished/unfinished, the latest run, checkpoints,
  a run's saved config;
* :mod:`qcflow.runs.resume`: ``resume=`` (where a training run continues, and fitting from there);
* :mod:`qcflow.runs.flow`: method A's ``flow_density`` bundle, codes table and encoders;
* :mod:`qcflow.runs.stages`: method B's task / teacher / student checkpoints;
* :mod:`qcflow.runs.scores`: an earlier ``score`` run's table (resume).

Layers (each imports only those below it)::

    cli, api  ->  tasks  ->  runs  ->  lit  ->  kspace, models, data, qc, utils
"""

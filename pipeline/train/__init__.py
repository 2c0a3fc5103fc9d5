"""Training on Ray Train + DeepSpeed ZeRO: one loop for every network of the cascade.

``config`` (the job's settings), ``data`` (shards -> token-budget batches), ``tasks`` (what each network
computes from a batch), ``engine`` (DeepSpeed config, EMA), ``checkpoints``, ``loop``
(``train_loop_per_worker``), ``trainer`` (Ray's TorchTrainer and the curriculum).
"""

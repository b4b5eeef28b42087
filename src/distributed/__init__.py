"""The one place that knows about processes: ``ranks`` (which batches are mine, sums over ranks,
for one process, torchrun data parallelism and --shard alike) and ``sharding`` (FSDP2 shards and
where their values live)."""

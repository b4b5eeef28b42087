"""The one place that knows about ranks: FSDP2 shards and their layouts, rank groups, sums over
ranks (``sharding``)."""

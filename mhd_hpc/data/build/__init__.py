"""Dataset building: sources (IDX files, image folders), the partition into clients, and the
shards written once per dataset (never opened while a job trains)."""

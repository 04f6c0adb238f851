"""Jobs: the status state machine, the job record and the durable store."""

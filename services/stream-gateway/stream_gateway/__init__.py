"""stream-gateway: SSE streams to waiting browsers, multiplexed over Redis pub/sub."""

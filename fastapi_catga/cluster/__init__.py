"""The cluster: membership, the live-node view, routing and failover, written once above transports."""

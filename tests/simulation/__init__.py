"""A seeded fault simulator: many nodes on the in-memory broker, on a virtual clock.

A random workload (send, send_to_node, broadcast, publish, routing keys, failing and slow handlers)
runs interleaved with random faults (crash, pause/resume, broker outage, frozen broker, join,
graceful leave), and the invariants in `tests.simulation.invariants` are checked after every step.
Everything random comes from the seed, so a run replays exactly::

    python -m tests.simulation --seed 123 --steps 2000

``messages`` holds what the nodes run, ``world`` the nodes and the ledger of calls and handler runs
(fed by the hooks in ``probes``), ``workload`` and ``faults`` what each step does, ``invariants``
the checks, ``run`` one whole run; ``test_simulation`` runs a fixed set of seeds.
"""

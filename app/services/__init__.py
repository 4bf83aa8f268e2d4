"""Services behind the routes and commands: ingest, retrieval, store, reconcile, metrics."""

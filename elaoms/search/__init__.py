"""In-call memory search: the `search-data` server tool and the per-caller ranker."""

"""The operator console: web pages over the service's parts (docs/console.md)."""

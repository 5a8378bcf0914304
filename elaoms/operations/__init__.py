"""What a production webhook receiver needs around the webhooks: logs, files, alerts."""

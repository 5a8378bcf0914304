"""Authenticated admin endpoints (ADMIN_API_KEY): data-protection requests."""

"""The relay's HTTP listeners: public tracking, the authenticated API, metrics."""

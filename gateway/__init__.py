"""Caravan's HTTP gateway: a thin FastAPI layer over the control plane."""

"""Control plane: the litestar app (REST API, health probes) over the control DB."""

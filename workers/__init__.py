"""Data plane: arq workers that run relay slices under fenced leases."""

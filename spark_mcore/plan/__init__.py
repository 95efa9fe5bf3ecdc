"""Capacity planning: memory per GPU, step time and weight-sync time for a model and a layout."""

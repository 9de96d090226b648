"""Accuracy evaluation of a served model through its HTTP API."""

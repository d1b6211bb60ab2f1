"""Sensor sources (simulated, csv, mqtt) and windowing."""

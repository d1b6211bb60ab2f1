"""Sensor sources (simulated, csv, mqtt, serial, modbus, iio) and windowing."""

"""Compositions of networks, schedules and samplers into end-to-end pipelines."""

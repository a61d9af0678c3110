"""The config room: a TOML file becomes a checked Config (loader.py, with the table helpers in
tables.py and the [[worker]], [[transport]] and [host] tables in workers.py, transports.py and
host.py; backends.py picks a worker's native backend, templates.py builds generator frames),
and a Config becomes the specs of the processes to start (specs.py: `plan`)."""

from dataplane.config.loader import Config, ConfigError, Metrics, load, loads
from dataplane.config.specs import arena_filename, ensure_run_dir, plan

__all__ = ["Config", "ConfigError", "Metrics", "arena_filename", "ensure_run_dir", "load",
           "loads", "plan"]

"""What several test modules share that is not a fixture (fixtures: tests/conftest.py)."""
